"""Behaviour-cloning policies: a small MLP on frozen Toto features (CortexBench-style) or a small
CNN trained end to end on pixels, both with proprioception concatenated.

Image context: the last ``context`` frames (1 = the current frame as an image sequence
``[3] + codes``; k > 1 = a video sequence ``[1] + codes`` of the last k frames, the first frame
repeated at an episode's start). Toto features of a layer are the mean of the residual stream
over the last frame's code positions (which, in a causal model, have seen the earlier frames);
several layers are concatenated (e.g. middle + last: the paper finds both work for robotics).

A policy folder holds ``policy.json`` (what it is: encoder, layers, context, normalisation) and
``policy.safetensors`` (the trained head / CNN); the frozen Toto is re-loaded from the
checkpoint it names (random-init Toto from the checkpoint's config and seed).
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

ENCODERS = ("toto", "toto-random", "cnn")


def window_index(lengths: list[int], context: int) -> np.ndarray:
    """``(N, context)`` indices into the episodes' concatenated frames: step t's last ``context``
    frames, clamped at its episode's first frame."""
    out, start = [], 0
    for n in lengths:
        t = np.arange(n)[:, None] + np.arange(-context + 1, 1)[None]
        out.append(start + np.clip(t, 0, None))
        start += n
    return np.concatenate(out) if out else np.zeros((0, context), dtype=np.int64)


def resize_frames(frames: np.ndarray, resolution: int) -> np.ndarray:
    """``(N, H, W, 3) uint8`` -> ``(N, R, R, 3)`` (area filter), unchanged if already R."""
    if frames.shape[1] == resolution and frames.shape[2] == resolution:
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class TotoEncoder:
    """Frozen Toto as a feature function: frames ``(B, k, H, W, 3) uint8`` -> ``(B, sum of widths)``."""

    def __init__(self, model, layout, tokenizer, layers: list[int], context: int):
        self.model, self.layout, self.tokenizer = model.eval(), layout, tokenizer
        self.layers, self.context = list(layers), context
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = model.cfg.dim * len(self.layers)
        self.device = next(model.parameters()).device

    @staticmethod
    def backbone(checkpoint: str | Path, tokenizer: str | Path, context: int, device: str | torch.device = "cpu"):
        """The framework's loader (toto.eval.backbone) for ``context``-frame windows: checkpoint and
        tokenizer checked to belong together; its ``models()`` gives the trained model and the
        random-init baseline (the run's step-0 weights)."""
        from ..eval.backbone import load_backbone
        from ..eval.features import SequenceSpec

        spec = SequenceSpec("video" if context > 1 else "image", frames=context, stride=1)
        return load_backbone(checkpoint, tokenizer, spec, device)

    @classmethod
    def load(cls, checkpoint: str | Path, tokenizer: str | Path, layers: list[int], context: int,
             random_init: bool = False, device: str | torch.device = "cpu") -> "TotoEncoder":
        bb = cls.backbone(checkpoint, tokenizer, context, device)
        return cls.of(bb, bb.random_init() if random_init else bb.model, layers, context)

    @classmethod
    def of(cls, bb, model, layers: list[int], context: int) -> "TotoEncoder":
        """An encoder on ``model`` (``bb.model`` or its random-init baseline), layers checked."""
        return cls(model, bb.layout, bb.tokenizer, bb.check_layers(layers, "--layers"), context)

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        b, k = frames.shape[:2]
        if k != self.context:
            raise ConfigError(f"expected {self.context} context frames, got {k}")
        flat = resize_frames(frames.reshape(b * k, *frames.shape[2:]), self.tokenizer.resolution)
        from ..eval.features import to_sequence

        codes = self.tokenizer.encode(flat)  # (b*k, h, w)
        per_frame = codes.shape[1] * codes.shape[2]
        kind = "video" if k > 1 else "image"
        tokens = torch.from_numpy(np.stack([to_sequence(c, self.layout, kind)
                                            for c in codes.reshape(b, k, *codes.shape[1:])]))
        hidden = self.model.hidden_states(tokens.to(self.device), self.layers)
        return torch.cat([hidden[l][:, -per_frame:].float().mean(1) for l in self.layers], 1).cpu()


class PixelCNN(nn.Module):
    """A small conv net over the stacked context frames, trained end to end with the head: frames
    area-resized to ``size`` px (64: what a 64 px tokenizer sees too), an 8x8 stride-4 stem as in
    DQN's Atari net, three stride-2 convs; cheap enough to train on a CPU."""

    def __init__(self, context: int, width: int = 32, size: int = 64):
        super().__init__()
        self.size = size
        c = 3 * context
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 8, 4, 2), nn.GroupNorm(8, width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.GroupNorm(8, 2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, 2, 1), nn.GroupNorm(8, 4 * width), nn.ReLU(),
            nn.Conv2d(4 * width, 4 * width, 3, 2, 1), nn.GroupNorm(8, 4 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.dim = 16 * width

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames: (B, k, H, W, 3) uint8`` -> ``(B, dim)``."""
        b, k, h, w, _ = frames.shape
        x = frames.permute(0, 1, 4, 2, 3).reshape(b, 3 * k, h, w).float() / 127.5 - 1
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="area")
        return self.net(x)


class Head(nn.Module):
    """The BC head: standardised (visual features, proprioception) -> action, a 2-layer MLP."""

    def __init__(self, feat_dim: int, proprio_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(feat_dim + proprio_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, action_dim))
        for name in ("feat_mean", "feat_std", "prop_mean", "prop_std"):
            dim = feat_dim if name.startswith("feat") else proprio_dim
            self.register_buffer(name, torch.zeros(dim) if name.endswith("mean") else torch.ones(dim))

    def set_stats(self, feats: torch.Tensor | None, proprio: torch.Tensor) -> None:
        if feats is not None:
            self.feat_mean.copy_(feats.mean(0))
            self.feat_std.copy_(feats.std(0).clamp_min(1e-3))
        self.prop_mean.copy_(proprio.mean(0))
        self.prop_std.copy_(proprio.std(0).clamp_min(1e-3))

    def forward(self, feats: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        x = torch.cat([(feats - self.feat_mean) / self.feat_std, (proprio - self.prop_mean) / self.prop_std], 1)
        return self.mlp(x)


@dataclass
class PolicySpec:
    encoder: str  # toto | toto-random | cnn
    context: int
    proprio_dim: int
    action_dim: int
    feat_dim: int
    layers: list[int] | None = None
    checkpoint: str | None = None
    tokenizer: str | None = None
    task: str | None = None
    resolution: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Policy(nn.Module):
    """Encoder + head; ``act`` maps one observation (with its frame history) to an action."""

    def __init__(self, spec: PolicySpec, encoder: TotoEncoder | None = None):
        super().__init__()
        self.spec = spec
        self.encoder = encoder  # frozen Toto (not a submodule: not trained, not saved)
        self.cnn = PixelCNN(spec.context) if spec.encoder == "cnn" else None
        self.head = Head(spec.feat_dim, spec.proprio_dim, spec.action_dim)

    def features(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self.cnn is not None:
            return self.cnn(torch.as_tensor(frames))
        return self.encoder(np.asarray(frames))

    def forward(self, feats: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.head(feats, proprio)

    def reset(self) -> None:
        self._history = collections.deque(maxlen=self.spec.context)

    @torch.no_grad()
    def act(self, frame: np.ndarray, proprio: np.ndarray) -> np.ndarray:
        if not self._history:
            self._history.extend([frame] * self.spec.context)
        else:
            self._history.append(frame)
        frames = np.stack(self._history)[None]
        feats = self.features(frames)
        return self.head(feats, torch.as_tensor(proprio, dtype=torch.float32)[None])[0].numpy()

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        from ..ioutil import atomic_dir, atomic_write_json

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_dir(folder) as tmp:
            save_file(tensors, str(tmp / "policy.safetensors"))
            atomic_write_json(tmp / "policy.json", self.spec.to_dict())

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> "Policy":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "policy.json").is_file():
            raise CheckpointError(f"{folder}: not a policy folder (no policy.json)")
        spec = PolicySpec(**json.loads((folder / "policy.json").read_text()))
        enc = None
        if spec.encoder != "cnn":
            enc = TotoEncoder.load(spec.checkpoint, spec.tokenizer, spec.layers, spec.context,
                                   random_init=spec.encoder == "toto-random", device=device)
        pol = cls(spec, enc)
        pol.load_state_dict(load_file(str(folder / "policy.safetensors")))
        return pol.eval()
