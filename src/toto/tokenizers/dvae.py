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


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Conv2d(nn.Module):
    """The reference's convolution: parameters ``w``/``b``, 'same' padding, optional fp16 on CUDA."""

    def __init__(self, n_in: int, n_out: int, kw: int, use_float16: bool = True):
        super().__init__()
        self.kw, self.use_float16 = kw, use_float16
        self.low: torch.dtype | None = None  # set by set_precision(); only ever applies on CUDA
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None and self.use_float16 and x.is_cuda:
            x, w, b = x.to(self.low), self.w.to(self.low), self.b.to(self.low)
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
    def set_precision(self, precision: str) -> None:
        """``fp16``/``bf16``: run the convolutions the reference runs in fp16 on CUDA in that type
        (the logit-producing ones stay fp32, as in the reference); no effect on CPU."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.low = PRECISIONS[precision]


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


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


class FusedCPUEncoder:
    """Inference-only CPU encoder: ``Encoder``'s convolutions as oneDNN primitives on
    channels-last tensors, with the ReLU after ``conv_1..3`` and the residual add after
    ``conv_4`` fused into the convolution, and weights packed once per input shape (the
    reference re-lays every weight, and converts every activation from and to NCHW, on each
    call). When a block's ``post_gain`` is a power of two (it is ``1/64`` in DALL-E's dVAE)
    it is folded into ``conv_4``: scaling by a power of two is exact, so that fold changes no
    bit. What remains differs from the reference only in the order of float additions inside
    a convolution, so codes (the argmax over the vocabulary) equal the reference's except at
    exact near-ties; tests/test_dvae.py and benchmarks/bench_tokenize.py check that on real
    frames."""

    _STRIDE = [1, 1]

    def __init__(self, encoder: Encoder):
        if not torch.backends.mkldnn.is_available():
            raise ConfigError("the fused CPU dVAE encoder needs a PyTorch built with oneDNN (mkldnn)")
        self.steps: list[tuple] = []  # ("conv", c) | ("block", id_conv|None, c1, c2, c3, c4, gain) | ("pool",) | ("out", c)
        for name, mod in encoder.blocks.named_children():
            if name == "input":
                self.steps.append(("conv", self._conv(mod)))
            elif name == "output":
                self.steps.append(("out", self._conv(mod.conv)))
            else:
                for sub in mod.children():
                    if isinstance(sub, nn.MaxPool2d):
                        self.steps.append(("pool",))
                        continue
                    r, g = sub.res_path, sub.post_gain
                    fold = _is_power_of_two(g)
                    idc = None if isinstance(sub.id_path, nn.Identity) else self._conv(sub.id_path)
                    self.steps.append(("block", idc, self._conv(r.conv_1), self._conv(r.conv_2),
                                       self._conv(r.conv_3), self._conv(r.conv_4, g if fold else 1.0),
                                       None if fold else g))
        self._packed: dict[tuple, list] = {}  # input shape -> packed weights, in call order

    @staticmethod
    def _conv(conv: Conv2d, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        w = (conv.w.detach().float() * scale).contiguous(memory_format=torch.channels_last)
        return w, conv.b.detach().float() * scale, [(conv.kw - 1) // 2] * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, 3, H, W)`` mapped pixels -> logits ``(N, vocab, H/d, W/d)`` (channels-last)."""
        key = tuple(x.shape)
        packed = self._packed.get(key)
        fresh = packed is None
        if fresh:  # first call with this shape: pack each weight for it, in call order
            if len(self._packed) >= 2:  # a few shapes at most (batch, tail): bound the memory
                self._packed.clear()
            packed = self._packed[key] = []
        weights = iter(packed)
        one = [1, 1]

        def conv(c, x: torch.Tensor, attr: str = "none", add: torch.Tensor | None = None) -> torch.Tensor:
            w, b, pad = c
            if fresh:
                packed.append(torch.ops.mkldnn._reorder_convolution_weight(w, pad, one, one, 1, list(x.shape)))
            w = packed[-1] if fresh else next(weights)
            if add is None:
                return torch.ops.mkldnn._convolution_pointwise(x, w, b, pad, one, one, 1, attr, [], "")
            # in place: add <- add + conv(x) (the residual path, not needed afterwards)
            return torch.ops.mkldnn._convolution_pointwise_.binary(add, x, w, b, pad, one, one, 1, "add", 1.0,
                                                                    None, [], None)

        x = x.float().contiguous(memory_format=torch.channels_last)
        for step in self.steps:
            kind = step[0]
            if kind == "conv":
                x = conv(step[1], x)
            elif kind == "pool":
                x = F.max_pool2d(x, 2)
            elif kind == "out":
                x = conv(step[1], torch.relu(x))
            else:
                _, idc, c1, c2, c3, c4, gain = step
                h = conv(c3, conv(c2, conv(c1, torch.relu(x), "relu"), "relu"), "relu")
                res = x if idc is None else conv(idc, x)
                if gain is None:
                    x = conv(c4, h, add=res)
                else:  # post_gain not a power of two: keep the reference's rounding
                    x = res + gain * conv(c4, h)
        return x


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
    the decoder's mean image.

    Encoding runs, on CPU, the fused oneDNN encoder (``FusedCPUEncoder``; same codes as the
    reference, faster); on CUDA the ``Encoder`` in channels-last with its residual convolutions in
    ``precision`` (``fp16`` by default, as the reference; ``bf16``; ``fp32``: all fp32), compiled
    with ``torch.compile`` when ``compile`` is true. Reduced precision flips codes at near-ties
    (tests/test_cuda.py bounds how many). A frame's codes never depend on which frames share its
    batch, so a run split across processes is byte-identical to a one-process run: on CPU the
    oneDNN kernels are batch-invariant (tests/test_dvae.py), on CUDA every call gets exactly
    ``batch_size`` frames (the last batch padded), which also keeps compile from re-tracing."""

    kind = "dvae"

    def __init__(self, cfg: DVAEConfig, encoder: Encoder | None = None, decoder: Decoder | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, precision: str | None = None,
                 compile: bool = False, source: str = ""):
        self.cfg = cfg.validate()
        self.n_codes, self.downsample, self.resolution = cfg.vocab_size, cfg.downsample, cfg.resolution
        self.source = source  # free text recorded in the file (e.g. "dall-e official weights")
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.encoder = (encoder or Encoder(cfg)).to(self.device).eval().requires_grad_(False)
        self.decoder = (decoder or Decoder(cfg)).to(self.device).eval().requires_grad_(False)
        self._fingerprint: str | None = None
        self.set_speed(precision, compile)

    def set_speed(self, precision: str | None = None, compile: bool = False) -> None:
        """Choose the CUDA precision (``fp32``/``fp16``/``bf16``; default fp16 on CUDA, as the
        reference) and whether to ``torch.compile`` the CUDA encoder. CPU always runs fp32."""
        precision = precision or ("fp16" if self.device.type == "cuda" else "fp32")
        if precision not in PRECISIONS:
            raise ConfigError(f"dVAE precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision, self.compile = precision, compile
        self.encoder.set_precision(precision)
        self.decoder.set_precision(precision)
        self._encode_fn = None  # built on first use (see _encoder_fn)

    def _encoder_fn(self):
        """The fastest exact encoder for the device: fused oneDNN on CPU, channels-last (and
        compiled on request) on CUDA; the plain module elsewhere. Built on the first encode from
        the weights then in ``self.encoder`` (the CPU one copies them): after changing those
        weights, call ``set_speed`` to rebuild it."""
        if self._encode_fn is None:
            if self.device.type == "cpu" and torch.backends.mkldnn.is_available():
                self._encode_fn = FusedCPUEncoder(self.encoder)
            elif self.device.type == "cuda":
                net = self.encoder.to(memory_format=torch.channels_last)
                self._encode_fn = torch.compile(net, dynamic=False) if self.compile else net
            else:
                self._encode_fn = self.encoder
        return self._encode_fn

    # -- the Tokenizer interface -------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """``frames: (N, H, W, 3) uint8`` -> ``codes: (N, H/d, W/d) int64``."""
        frames = self.check_frames(frames)
        if not len(frames):
            return np.zeros((0, *self._grid_of(frames)), np.int64)
        fn, bs, out = self._encoder_fn(), self.batch_size, []
        for i in range(0, len(frames), bs):
            chunk = torch.from_numpy(frames[i:i + bs]).to(self.device)
            n = len(chunk)
            if n < bs and self.device.type == "cuda":  # pad with copies of the last frame: one shape
                chunk = torch.cat([chunk, chunk[-1:].expand(bs - n, *chunk.shape[1:])])
            out.append(fn(frames_to_input(chunk)).argmax(dim=1)[:n].cpu())
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
    def load(cls, path: str | Path, device: str = "cpu", batch_size: int = 32, precision: str | None = None,
             compile: bool = False) -> "DVAETokenizer":
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
        return cls(cfg, nets["encoder"], nets["decoder"], device=device, batch_size=batch_size,
                   precision=precision, compile=compile, source=source)


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
