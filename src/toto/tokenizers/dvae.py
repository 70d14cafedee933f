"""The DALL-E discrete VAE, parameter-compatible with OpenAI's ``dall-e`` package.

``Encoder`` and ``Decoder`` build the same modules under the same names as ``dall_e.Encoder`` and
``dall_e.Decoder`` (``blocks.group_1.block_1.res_path.conv_1.w`` ...), so the official weights load
into them unchanged.  Unlike the reference, the number of groups, blocks per group, width and
vocabulary are free, so a tiny dVAE can be trained on a CPU (see ``train_dvae.py``).

Group ``g`` (1-based) of the encoder has ``2**(g-1) * n_hid`` channels and every group but the
last ends with a 2x max-pool, so the downsampling factor is ``2**(group_count-1)`` (8 for 4 groups).
The decoder mirrors it with nearest-neighbour upsampling and predicts ``2 * output_channels``
maps: the logit-Laplace location (the first 3) and log-scale (the last 3) of the mapped pixels.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import ConfigError, DataError
from .base import CONFIG_KEY, KIND_KEY, Tokenizer, register

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> [eps, 1-eps], where the logit-Laplace density is finite."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


@dataclass
class DVAEConfig:
    vocab_size: int = 8192
    n_hid: int = 256
    n_blk_per_group: int = 2
    group_count: int = 4
    n_init: int = 128  # decoder width right after the code embedding
    input_channels: int = 3
    output_channels: int = 3  # the decoder predicts 2x this many maps (location, log-scale)
    resolution: int = 128  # frame size the tokenizer is used at (the nets are fully convolutional)

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def validate(self) -> "DVAEConfig":
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"dvae.{f.name} must be a positive integer, got {v!r}")
        if self.n_hid % 4:
            raise ConfigError(f"dvae.n_hid must be a multiple of 4 (blocks use n_hid/4 channels), got {self.n_hid}")
        if self.vocab_size < 2:
            raise ConfigError(f"dvae.vocab_size must be at least 2, got {self.vocab_size}")
        if self.resolution % self.downsample:
            raise ConfigError(f"dvae.resolution {self.resolution} is not a multiple of the downsampling "
                              f"factor {self.downsample} (2**(group_count-1))")
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "dvae config") -> "DVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d).validate()


class Conv2d(nn.Module):
    """The reference's convolution: parameters ``w``/``b``, 'same' padding, optional fp16 on CUDA."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        self.kw, self.use_float16 = kw, use_float16
        self.half = False  # set by set_fp16(); fp16 only ever applies on CUDA
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.half and self.use_float16 and x.is_cuda:
            x, w, b = x.half(), self.w.half(), self.b.half()
        else:
            x, w, b = x.float(), self.w, self.b
        return F.conv2d(x, w, b, padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    """Residual block: identity (or 1x1 conv) + post_gain * (4 convs on n_out/4 channels)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        chans = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(chans[i], chans[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _Net(nn.Module):
    def set_fp16(self, enabled: bool) -> None:
        """Run the convolutions the reference runs in fp16 on CUDA in fp16 too (no effect on CPU)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.half = enabled


class Encoder(_Net):
    """``x: (N, 3, H, W)`` mapped pixels -> ``logits: (N, vocab, H/d, W/d)``."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        c, G, B = cfg.n_hid, cfg.group_count, cfg.n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.input_channels, c, 7))]
        n_in = c
        for g in range(1, G + 1):
            n_out = 2 ** (g - 1) * c
            layers = [(f"block_{i + 1}", _Block(n_in if i == 0 else n_out, n_out, G * B, (3, 3, 3, 1)))
                      for i in range(B)]
            if g < G:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            n_in = n_out
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_in, cfg.vocab_size, 1, use_float16=False))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(_Net):
    """``z: (N, vocab, h, w)`` one-hot or relaxed codes -> ``(N, 2*3, h*d, w*d)`` logit-Laplace stats."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        c, G, B = cfg.n_hid, cfg.group_count, cfg.n_blk_per_group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1, use_float16=False))]
        n_in = cfg.n_init
        for g in range(1, G + 1):
            n_out = 2 ** (G - g) * c
            layers = [(f"block_{i + 1}", _Block(n_in if i == 0 else n_out, n_out, G * B, (1, 3, 3, 3)))
                      for i in range(B)]
            if g < G:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(layers))))
            n_in = n_out
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_in, 2 * cfg.output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes: (N, h, w) int64`` -> stats, as ``forward(one_hot(codes))`` but with a row lookup
        instead of a 1x1 convolution over ``vocab`` mostly-zero channels."""
        conv = self.blocks.input
        emb = conv.w[:, :, 0, 0].t()  # (vocab, n_init)
        x = emb[codes].permute(0, 3, 1, 2) + conv.b[None, :, None, None]
        for name, mod in self.blocks.named_children():
            if name != "input":
                x = mod(x)
        return x


def decoder_mean(stats: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Decoder stats -> pixels in [0, 1]: the location of the logit-Laplace, unmapped."""
    return unmap_pixels(torch.sigmoid(stats[:, :channels].float()))


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """``frames: (N, H, W, 3) uint8`` -> ``(N, 3, H, W)`` float32 mapped pixels."""
    return map_pixels(frames.permute(0, 3, 1, 2).float() / 255.0)


@register
class DVAETokenizer(Tokenizer):
    """DALL-E-style dVAE tokenizer: codes are the argmax of the encoder logits; decoding returns
    the decoder's mean image.  ``fp16`` (CUDA only) runs the convolutions the reference runs in
    fp16 in fp16; codes may then differ from fp32 at near-ties, as they do for the reference."""

    kind = "dvae"

    def __init__(self, cfg: DVAEConfig, encoder: Encoder | None = None, decoder: Decoder | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, fp16: bool | None = None,
                 source: str = ""):
        self.cfg = cfg.validate()
        self.n_codes, self.downsample, self.resolution = cfg.vocab_size, cfg.downsample, cfg.resolution
        self.source = source  # free text recorded in the file (e.g. "dall-e official weights")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.encoder = (encoder or Encoder(cfg)).to(self.device).eval().requires_grad_(False)
        self.decoder = (decoder or Decoder(cfg)).to(self.device).eval().requires_grad_(False)
        self.fp16 = self.device.type == "cuda" if fp16 is None else fp16
        self.encoder.set_fp16(self.fp16)
        self.decoder.set_fp16(self.fp16)
        self._fingerprint: str | None = None

    # -- the Tokenizer interface -------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """``frames: (N, H, W, 3) uint8`` -> ``codes: (N, H/d, W/d) int64``."""
        frames = self.check_frames(frames)
        out = []
        for i in range(0, len(frames), self.batch_size):
            x = frames_to_input(torch.from_numpy(frames[i:i + self.batch_size]).to(self.device))
            out.append(self.encoder(x).argmax(dim=1).cpu())
        if not out:
            return np.zeros((0, *self._grid_of(frames)), np.int64)
        return torch.cat(out).numpy().astype(np.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``codes: (N, h, w)`` -> ``frames: (N, h*d, w*d, 3) uint8``."""
        codes = self.check_codes(codes)
        out = []
        for i in range(0, len(codes), self.batch_size):
            z = torch.from_numpy(codes[i:i + self.batch_size]).to(self.device)
            x = decoder_mean(self.decoder.forward_codes(z), self.cfg.output_channels)
            out.append((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        if not out:
            h, w = codes.shape[1:]
            return np.zeros((0, h * self.downsample, w * self.downsample, 3), np.uint8)
        return torch.cat(out).numpy()

    def _grid_of(self, frames: np.ndarray) -> tuple[int, int]:
        return frames.shape[1] // self.downsample, frames.shape[2] // self.downsample

    # -- storage ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {**asdict(self.cfg), "source": self.source}

    def tensors(self) -> dict[str, torch.Tensor]:
        """``encoder.<name>`` and ``decoder.<name>`` with the reference's parameter names."""
        out = {}
        for prefix, net in (("encoder", self.encoder), ("decoder", self.decoder)):
            for k, v in net.state_dict().items():
                out[f"{prefix}.{k}"] = v.detach().float().contiguous().cpu()
        return out

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 32,
             fp16: bool | None = None) -> "DVAETokenizer":
        from safetensors.torch import load_file

        from .base import read_metadata

        meta = read_metadata(path)
        if meta.get(KIND_KEY) != cls.kind:
            raise DataError(f"{path}: not a dVAE tokenizer file (kind {meta.get(KIND_KEY)!r})")
        try:
            raw = json.loads(meta[CONFIG_KEY])
        except (KeyError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: missing or unreadable tokenizer config in metadata ({e})") from None
        source = raw.pop("source", "")
        try:
            cfg = DVAEConfig.from_dict(raw, where=str(path))
        except (ConfigError, TypeError) as e:
            raise DataError(f"{path}: bad dVAE config in metadata: {e}") from None
        tensors = load_file(str(path))
        nets = {}
        for prefix, net_cls in (("encoder", Encoder), ("decoder", Decoder)):
            net = net_cls(cfg)
            sd = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            load_state(net, sd, f"{path} ({prefix})")
            nets[prefix] = net
        return cls(cfg, nets["encoder"], nets["decoder"], device=device, batch_size=batch_size, fp16=fp16,
                   source=source)


def load_state(net: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a message that names the first missing, extra or mis-shaped tensor."""
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise DataError(f"{where}: tensors do not match the architecture (missing: {missing[:3]}, "
                        f"unexpected: {extra[:3]})")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise DataError(f"{where}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    net.load_state_dict({k: v.float() for k, v in sd.items()})
