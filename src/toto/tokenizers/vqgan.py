"""The VQGAN tokenizer, parameter-compatible with taming-transformers' ``VQModel``.

``VQGAN`` builds the same modules under the same names as ``taming.models.vqgan.VQModel``
(``encoder.down.0.block.0.norm1.weight``, ``quant_conv``, ``quantize.embedding``,
``post_quant_conv``, ``decoder.up.4.attn.1.q.weight`` ...) minus its training loss, so the weights
of a taming checkpoint load unchanged (see ``vqgan_convert.py``). The public ImageNet models are
the f16 configuration: ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual blocks per level, z 256,
self-attention at the 16x16 level and in the middle, 1024 or 16384 codes of dimension 256.

Pixels are mapped to [-1, 1] (``x / 127.5 - 1``, as taming's data loaders do); the code of a
grid cell is the nearest codebook vector (squared L2, computed as taming's ``VectorQuantizer2``
computes it, so near-ties break the same way); decoding clamps the decoder's output to [-1, 1].
The downsampling is ``2**(len(ch_mult)-1)``: a 256 px frame gives 16x16 codes, 128 px 8x8.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import resolve_device
from ..errors import ConfigError, DataError
from .base import CONFIG_KEY, KIND_KEY, Tokenizer, read_metadata, register

# our field -> its name in a taming config (``model.params`` / ``model.params.ddconfig``)
CONFIG_NAMES = {"n_embed": "n_embed", "embed_dim": "embed_dim", "ch": "ddconfig.ch",
                "ch_mult": "ddconfig.ch_mult", "num_res_blocks": "ddconfig.num_res_blocks",
                "attn_resolutions": "ddconfig.attn_resolutions", "z_channels": "ddconfig.z_channels",
                "in_channels": "ddconfig.in_channels", "out_ch": "ddconfig.out_ch",
                "model_resolution": "ddconfig.resolution", "resamp_with_conv": "ddconfig.resamp_with_conv",
                "resolution": "resolution (the frame size)"}


@dataclass
class VQGANConfig:
    n_embed: int = 16384  # codebook size
    embed_dim: int = 256  # codebook vector dimension
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (at model_resolution) with attention
    z_channels: int = 256
    in_channels: int = 3
    out_ch: int = 3
    model_resolution: int = 256  # taming's ddconfig.resolution: only places the attention blocks
    resamp_with_conv: bool = True
    resolution: int = 256  # frame size the tokenizer is used at (the nets are fully convolutional)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def level_sizes(self) -> list[int]:
        """Feature-map side of each encoder level at ``model_resolution``."""
        return [self.model_resolution // 2 ** i for i in range(len(self.ch_mult))]

    def attn_levels(self) -> list[bool]:
        return [r in self.attn_resolutions for r in self.level_sizes()]

    def validate(self, where: str = "vqgan config", prefix: str = "") -> "VQGANConfig":
        """``prefix`` (e.g. "model.params.") is put before the taming field names in messages."""
        def bad(name: str, msg: str):
            raise ConfigError(f"{where}: {'' if name == 'resolution' else prefix}{CONFIG_NAMES[name]} {msg}")

        for name in ("ch_mult", "attn_resolutions"):
            if not isinstance(getattr(self, name), (list, tuple)):
                bad(name, f"must be a list, got {getattr(self, name)!r}")
            setattr(self, name, tuple(getattr(self, name)))
        if not self.ch_mult:
            bad("ch_mult", "must list at least one level")
        if not isinstance(self.resamp_with_conv, bool):
            bad("resamp_with_conv", f"must be true or false, got {self.resamp_with_conv!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "resamp_with_conv" and any(not isinstance(x, int) or isinstance(x, bool) or x < 1
                                                   for x in (v if isinstance(v, tuple) else (v,))):
                bad(f.name, f"must be positive integer(s), got {v!r}")
        if self.n_embed < 2:
            bad("n_embed", f"must be at least 2, got {self.n_embed}")
        for name, c in [("ch", self.ch)] + [("ch_mult", self.ch * m) for m in self.ch_mult]:
            if c % 32:
                bad(name, f"gives {c} channels, not a multiple of 32 (the GroupNorm groups)")
        if self.model_resolution % self.downsample:
            bad("model_resolution", f"{self.model_resolution} is not a multiple of the downsampling "
                                    f"{self.downsample} (2**(len(ch_mult)-1))")
        sizes = self.level_sizes()
        for r in self.attn_resolutions:
            if r not in sizes:
                bad("attn_resolutions", f"{r} is not a feature-map size of this encoder (its levels are "
                                        f"{', '.join(map(str, sizes))} at ddconfig.resolution {self.model_resolution})")
        if self.resolution % self.downsample:
            bad("resolution", f"{self.resolution} is not a multiple of the downsampling {self.downsample}")
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str = "vqgan config") -> "VQGANConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**d).validate(where)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=k, stride=1, padding=k // 2)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), _conv(cin, cout)
        self.norm2, self.conv2 = _norm(cout), _conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))  # taming's dropout sits here; identity at inference
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, computed as taming computes it."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (_conv(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * (int(c) ** -0.5)
        w = F.softmax(w, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    def __init__(self, c: int, with_conv: bool):
        super().__init__()
        if with_conv:
            self.conv = _conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if hasattr(self, "conv") else x


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return m


def _mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """``(N, 3, H, W)`` in [-1, 1] -> ``(N, z_channels, H/d, W/d)``."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = _conv(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        c_in, attn, last = cfg.ch, cfg.attn_levels(), len(cfg.ch_mult) - 1
        for i, m in enumerate(cfg.ch_mult):
            c_out = cfg.ch * m
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            level = _level(blocks, [AttnBlock(c_out) for _ in blocks] if attn[i] else [])
            if i != last:
                level.downsample = Downsample(c_out, cfg.resamp_with_conv)
            self.down.append(level)
            c_in = c_out
        self.mid = _mid(c_in)
        self.norm_out, self.conv_out = _norm(c_in), _conv(c_in, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_swish(self.norm_out(_run_mid(self.mid, h))))


class Decoder(nn.Module):
    """``(N, z_channels, h, w)`` -> ``(N, out_ch, h*d, w*d)``, about [-1, 1]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = _conv(cfg.z_channels, c)
        self.mid = _mid(c)
        attn, levels = cfg.attn_levels(), []
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            level = _level(blocks, [AttnBlock(c_out) for _ in blocks] if attn[i] else [])
            if i != 0:
                level.upsample = Upsample(c_out, cfg.resamp_with_conv)
            levels.insert(0, level)  # up[i] is level i, as in taming
            c = c_out
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c), _conv(c, cfg.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)  # taming's init

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (N, D, h, w)`` -> nearest codes ``(N, h, w)``; ``|z|^2 + |e|^2 - 2 z.e`` evaluated
        in taming's order (rows in chunks of about 16M distances)."""
        n, d, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        e2 = torch.sum(e ** 2, dim=1)
        step = max(1, (1 << 24) // e.shape[0])
        out = [(torch.sum(zc ** 2, dim=1, keepdim=True) + e2 - 2 * torch.einsum("bd,dn->bn", zc, e.t())).argmin(1)
               for zc in zf.split(step)]
        return torch.cat(out).reshape(n, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` -> ``(N, D, h, w)``."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    """taming's ``VQModel`` without its loss: the same submodule names."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = Quantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


def frames_to_input(frames: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3) uint8`` -> ``(N, 3, H, W)`` float32 in [-1, 1], rounded as taming's
    ``(image / 127.5 - 1.0).astype(np.float32)`` (float64 arithmetic, then float32)."""
    return (frames.permute(0, 3, 1, 2).double() / 127.5 - 1.0).float()


def output_to_frames(x: torch.Tensor) -> torch.Tensor:
    """Decoder output ``(N, 3, H, W)`` -> ``(N, H, W, 3) uint8``."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@register
class VQGANTokenizer(Tokenizer):
    """VQGAN tokenizer (taming-transformers weights, or random ones for tests and baselines)."""

    kind = "vqgan"

    def __init__(self, cfg: VQGANConfig, model: VQGAN | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 8, source: str = ""):
        self.cfg = cfg.validate()
        self.n_codes, self.downsample, self.resolution = cfg.n_embed, cfg.downsample, cfg.resolution
        self.source = source  # free text recorded in the file (e.g. "converted from last.ckpt")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = (model or VQGAN(cfg)).to(self.device).eval().requires_grad_(False)
        self._fingerprint: str | None = None

    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        out = [self.model.encode(frames_to_input(torch.from_numpy(frames[i:i + self.batch_size]).to(self.device))).cpu()
               for i in range(0, len(frames), self.batch_size)]
        if not out:
            return np.zeros((0, frames.shape[1] // self.downsample, frames.shape[2] // self.downsample), np.int64)
        return torch.cat(out).numpy().astype(np.int64)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self.check_codes(codes)
        out = [output_to_frames(self.model.decode(torch.from_numpy(codes[i:i + self.batch_size]).to(self.device))).cpu()
               for i in range(0, len(codes), self.batch_size)]
        if not out:
            return np.zeros((0, codes.shape[1] * self.downsample, codes.shape[2] * self.downsample, 3), np.uint8)
        return torch.cat(out).numpy()

    # -- storage ---------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-native (lists, not tuples), so a recorded identity compares equal to a fresh one."""
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()},
                "source": self.source}

    def tensors(self) -> dict[str, torch.Tensor]:
        """taming's parameter names (``encoder.conv_in.weight``, ``quantize.embedding.weight``...)."""
        return {k: v.detach().float().contiguous().cpu() for k, v in self.model.state_dict().items()}

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 8) -> "VQGANTokenizer":
        from safetensors.torch import load_file

        from .dvae import load_state

        meta = read_metadata(path)
        if meta.get(KIND_KEY) != cls.kind:
            raise DataError(f"{path}: not a VQGAN tokenizer file (kind {meta.get(KIND_KEY)!r})")
        try:
            raw = json.loads(meta[CONFIG_KEY])
            source = raw.pop("source", "")
            cfg = VQGANConfig.from_dict(raw, where=str(path))
        except (KeyError, json.JSONDecodeError, ConfigError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: missing or bad VQGAN config in metadata ({e})") from None
        model = VQGAN(cfg)
        load_state(model, load_file(str(path)), str(path))
        return cls(cfg, model, device=device, batch_size=batch_size, source=source)
