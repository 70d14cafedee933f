"""Video forecasting: continue a clip from its first frames, token by token, and score it.

Pipeline for each input (a video file, or one sequence of a token-shard folder):

    video -> kept frames (stride, tokenizer resolution; as in pre-training)
          -> codes: (F, h, w), F = context + forecast frames
    prompt [1] + context codes -> generate forecast x h*w visual ids (KV cache; specials masked)
          -> forecast codes -> tokenizer.decode -> forecast frames: (N, R, R, 3) uint8

Metrics per forecast frame (``forecast.json``):
  * ``psnr`` / ``ssim``: forecast vs the real frame (what a viewer sees);
  * ``psnr_recon`` / ``ssim_recon``: forecast vs the tokenizer's reconstruction of the real
    frame (the best the model could do through this tokenizer: the model's own error);
  * ``tokenizer_psnr`` / ``tokenizer_ssim``: reconstruction vs real (the tokenizer's error);
  * ``token_accuracy``: share of forecast codes equal to the real frame's codes;
  * ``copy_last_*``: the same scores for repeating the last context frame, a trivial baseline.
A shard input has no pixels: its "real" frames are the tokenizer's reconstruction, so only the
``*_recon`` and token scores are written. PSNR of identical frames is infinite, written as null.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.video import read_video
from ..device import resolve_device
from ..commands.argtypes import positive_int
from ..config import DEVICE_HELP, option
from ..errors import ConfigError, DataError
from ..ioutil import atomic_file, atomic_write_json
from ..tokenizers.base import check_identity
from ..tokenizers.stats import psnr
from ..vocab import VocabLayout

# -- image metrics ------------------------------------------------------------------------------


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, population statistics, averaged over valid window positions and channels (the
    same definition as scikit-image's ``gaussian_weights=True, use_sample_covariance=False``).

    ``a, b: (H, W, C)`` or ``(H, W)`` with H, W >= 11.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if min(a.shape[:2]) < 11:
        raise DataError(f"ssim needs frames of at least 11x11 pixels, got {a.shape[0]}x{a.shape[1]}")
    x = torch.from_numpy(a).permute(2, 0, 1)[:, None]  # (C, 1, H, W)
    y = torch.from_numpy(b).permute(2, 0, 1)[:, None]
    w = _gaussian_window()[None, None]
    f = lambda t: torch.nn.functional.conv2d(t, w)  # noqa: E731  (valid positions only)
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def _finite(x: float) -> float | None:
    """JSON has no infinity: identical frames (PSNR inf) are written as null."""
    return None if math.isinf(x) else round(x, 4)


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 4) if vals else None


# -- settings and inputs ------------------------------------------------------------------------


@dataclass
class ForecastSettings:
    context_frames: int = option(4, "real frames given to the model", type=positive_int)
    frames: int = option(8, "frames to forecast", type=positive_int)
    temperature: float = option(1.0, "sampling temperature")
    top_k: int | None = option(None, "sample among the K most likely codes (default: all)", metavar="K")
    top_p: float | None = option(None, "nucleus sampling mass in (0, 1] (default: off)", metavar="P")
    greedy: bool = option(False, "always take the most likely code (ignores the above)")
    seed: int | None = option(0, "sampling seed")
    stride: int | None = option(None, "keep one video frame in STRIDE (default: the stride recorded in the index "
                                      "of the model's training shards, else 4)", type=positive_int)
    fps: int = option(4, "frame rate of the written videos", type=positive_int)
    device: str = option("auto", DEVICE_HELP)
    stride_source: str = "--stride"
    compile: bool = option(False, "compile the decode step (CUDA graphs on GPU: ~10x faster decoding after a "
                                  "one-off compilation of ~10 s; docs/performance.md)")

    def validate(self) -> "ForecastSettings":
        from ..model.generate import Sampling

        if self.context_frames < 1:
            raise ConfigError(f"--context-frames must be >= 1, got {self.context_frames}")
        if self.frames < 1:
            raise ConfigError(f"--frames must be >= 1, got {self.frames}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"--stride must be >= 1, got {self.stride}")
        if self.fps < 1:
            raise ConfigError(f"--fps must be >= 1, got {self.fps}")
        Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)  # checks them
        return self

    @property
    def total_frames(self) -> int:
        return self.context_frames + self.frames


@dataclass
class ForecastInput:
    name: str  # file-name stem for this item's outputs
    source: str
    codes: np.ndarray  # (F, h, w) int64 real codes, F = context + forecast frames
    frames: np.ndarray | None  # (F, R, R, 3) uint8 real pixels; None for token-shard input


def video_input(path: str | Path, tokenizer, s: ForecastSettings) -> ForecastInput:
    """Decode the first ``context + frames`` kept frames of a video and tokenize them."""
    path = Path(path)
    frames = read_video(path, s.stride, tokenizer.resolution, max_frames=s.total_frames)
    if len(frames) < s.total_frames:
        raise DataError(f"{path}: only {len(frames)} frames are kept at stride {s.stride}; forecasting needs "
                        f"{s.context_frames} context + {s.frames} real frames to compare against "
                        f"(lower --frames, --context-frames or --stride)")
    codes = tokenizer.encode(frames)  # (F, h, w)
    return ForecastInput(path.stem, str(path), codes.astype(np.int64), frames)


def shard_inputs(folder: str | Path, indices: list[int], tokenizer, s: ForecastSettings) -> list[ForecastInput]:
    """Video sequences ``indices`` of a token-shard folder (no pixels: scored against the
    tokenizer's reconstruction)."""
    from ..data.shards import ShardDataset

    ds = ShardDataset(folder)
    if ds.layout.n_codes != tokenizer.n_codes:
        raise DataError(f"{folder}: shards were built with {ds.layout.n_codes} codes, the tokenizer has "
                        f"{tokenizer.n_codes}")
    if tuple(ds.geometry.grid) != tuple(tokenizer.grid):
        raise DataError(f"{folder}: shards hold {ds.geometry.grid[0]}x{ds.geometry.grid[1]} codes per frame, "
                        f"the tokenizer makes {tokenizer.grid[0]}x{tokenizer.grid[1]}")
    check_identity(ds.index.get("tokenizer"), tokenizer, f"{folder} (index.json)", DataError)
    if ds.geometry.frames_per_sequence < s.total_frames:
        raise DataError(f"{folder}: sequences hold {ds.geometry.frames_per_sequence} frames; forecasting needs "
                        f"{s.context_frames} context + {s.frames} real frames")
    h, w = ds.geometry.grid
    out = []
    for i in indices:
        if not 0 <= i < len(ds):
            raise DataError(f"{folder}: sequence index {i} out of range (the folder holds {len(ds)})")
        seq = np.asarray(ds[i], dtype=np.int64)
        if seq[0] != ds.layout.video_start:
            raise DataError(f"{folder}: sequence {i} starts with id {seq[0]}, not the video start "
                            f"{ds.layout.video_start} (an image sequence cannot be forecast)")
        body = seq[1:1 + s.total_frames * h * w]
        try:
            codes = ds.layout.ids_to_codes(body).reshape(s.total_frames, h, w)
        except ValueError as e:
            raise DataError(f"{folder}: sequence {i}: {e}") from None
        out.append(ForecastInput(f"seq{i:06d}", f"{folder}#{i}", codes, None))
    return out


# -- outputs ------------------------------------------------------------------------------------


def _upscale(frames: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Nearest-neighbour upscale so small test frames stay visible; ``(N, H, W, 3)``."""
    k = max(1, min_side // frames.shape[1])
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def _border(img: np.ndarray, color, width: int = 2) -> np.ndarray:
    img = img.copy()
    img[:width], img[-width:], img[:, :width], img[:, -width:] = color, color, color, color
    return img


RED, GREEN, WHITE = (220, 30, 30), (30, 180, 60), (255, 255, 255)


def write_strip(path: Path, rows: list[tuple[str, np.ndarray]], context: int) -> None:
    """PNG: one labelled row per ``(label, frames (F, R, R, 3))``; a white gap after the context,
    forecast frames framed in red."""
    from PIL import Image, ImageDraw

    rows = [(label, _upscale(f)) for label, f in rows]
    F, R = rows[0][1].shape[0], rows[0][1].shape[1]
    pad, gap, label_w = 2, 8, 110
    width = label_w + F * (R + pad) + gap
    height = len(rows) * (R + pad) + 18
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    for r, (label, frames) in enumerate(rows):
        y = 18 + r * (R + pad)
        draw.text((4, y + R // 2 - 6), label, fill=(0, 0, 0))
        for t in range(F):
            x = label_w + t * (R + pad) + (gap if t >= context else 0)
            img = _border(frames[t], RED) if t >= context and label == "forecast" else frames[t]
            canvas.paste(Image.fromarray(img), (x, y))
    draw.text((label_w, 2), f"context ({context} frames)", fill=(0, 0, 0))
    draw.text((label_w + context * (R + pad) + gap, 2), "forecast", fill=RED)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")


def side_by_side(panels: list[np.ndarray], context: int) -> np.ndarray:
    """``panels: list of (F, R, R, 3)`` -> ``(F, R, n*R, 3)``; the last panel's forecast frames
    get a red border, its context frames a green one."""
    panels = [_upscale(p) for p in panels]
    last = np.stack([_border(f, GREEN if t < context else RED) for t, f in enumerate(panels[-1])])
    return np.concatenate(panels[:-1] + [last], axis=2)


def write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    from PIL import Image

    imgs = [Image.fromarray(f) for f in frames]
    with atomic_file(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> str:
    """H.264 (or MPEG-4 part 2 where libx264 is missing) via PyAV; returns the codec used."""
    import av

    H, W = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))  # yuv420p needs even sizes
    last_error = None
    for codec in ("libx264", "mpeg4"):
        try:
            with atomic_file(path) as tmp, av.open(str(tmp), "w", format="mp4") as c:
                st = c.add_stream(codec, rate=fps)
                st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
                for f in frames:
                    for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                        c.mux(pkt)
                for pkt in st.encode():
                    c.mux(pkt)
            return codec
        except (av.FFmpegError, ValueError) as e:  # codec not built into this FFmpeg
            last_error = e
    raise DataError(f"{path}: cannot encode mp4 ({last_error})")


# -- the job ------------------------------------------------------------------------------------


def frame_scores(forecast: np.ndarray, real: np.ndarray | None, recon: np.ndarray, pred_codes: np.ndarray,
                 real_codes: np.ndarray, last_real: np.ndarray | None, last_recon: np.ndarray,
                 last_codes: np.ndarray) -> list[dict]:
    """Per forecast frame scores; arrays are ``(N, R, R, 3)`` / ``(N, h, w)``, ``last_*`` one frame."""
    rows = []
    for t in range(len(forecast)):
        r = {"frame": t,
             "token_accuracy": round(float((pred_codes[t] == real_codes[t]).mean()), 4),
             "psnr_recon": _finite(psnr(forecast[t], recon[t])),
             "ssim_recon": round(ssim(forecast[t], recon[t]), 4),
             "copy_last_token_accuracy": round(float((last_codes == real_codes[t]).mean()), 4),
             "copy_last_psnr_recon": _finite(psnr(last_recon, recon[t]))}
        if real is not None:
            r.update(psnr=_finite(psnr(forecast[t], real[t])), ssim=round(ssim(forecast[t], real[t]), 4),
                     tokenizer_psnr=_finite(psnr(recon[t], real[t])),
                     tokenizer_ssim=round(ssim(recon[t], real[t]), 4),
                     copy_last_psnr=_finite(psnr(last_real, real[t])),
                     copy_last_ssim=round(ssim(last_real, real[t]), 4))
        rows.append(r)
    return rows


DEFAULT_STRIDE = 4  # SPEC: one frame in 4


def training_stride(cfg) -> tuple[int, str]:
    """The stride the model's training videos were sampled at, read from the index of the shard
    folder its config names (``toto tokenize`` records it); SPEC's 4 when that is unavailable."""
    from ..config import data_paths
    from ..data.shards import read_index

    for path in data_paths(cfg.data):  # a mix: the first folder that records a stride (image folders do not)
        try:
            stride = read_index(path).get("meta", {}).get("config", {}).get("stride")
        except DataError:
            stride = None
        if isinstance(stride, int) and stride >= 1:
            return stride, f"training data {path}"
    return DEFAULT_STRIDE, "default"


def load_for_forecast(checkpoint: str | Path, tokenizer_path: str | Path, s: ForecastSettings):
    """(backbone, device): the checkpoint and tokenizer through the one loader
    (toto.eval.backbone), checked against context + forecast frames; an unset ``s.stride`` is
    filled in from the training data first (``s.stride_source`` says where)."""
    from ..eval.features import SequenceSpec
    from ..train.checkpoint import read_config
    from .backbone import load_backbone

    device = resolve_device(s.device)
    if s.stride is None:
        s.stride, s.stride_source = training_stride(read_config(checkpoint))
    return load_backbone(checkpoint, tokenizer_path, SequenceSpec("video", s.total_frames, s.stride), device), device


def forecast(model, layout: VocabLayout, tokenizer, items: list[ForecastInput], s: ForecastSettings,
             out: str | Path, device: torch.device, progress: bool = True, meta: dict | None = None) -> dict:
    """Forecast every item in one batched generation; write strips, videos, codes and
    ``forecast.json`` under ``out``; return the report."""
    from safetensors.numpy import save_file

    from ..model.generate import Sampling, generate, visual_ids_mask
    from ..train.optim import autocast_for

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    h, w = tokenizer.grid
    hw, C, N = h * w, s.context_frames, s.frames
    for it in items:
        if it.codes.shape != (s.total_frames, h, w):
            raise DataError(f"{it.source}: codes of shape {it.codes.shape}, expected {(s.total_frames, h, w)}")
    ctx_ids = np.stack([layout.codes_to_ids(it.codes[:C].reshape(-1)).astype(np.int64) for it in items])
    prompt = torch.from_numpy(np.concatenate([np.full((len(items), 1), layout.video_start), ctx_ids], 1))

    t0 = time.perf_counter()
    with autocast_for(device, "auto"):
        sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, greedy=s.greedy, seed=s.seed,
                            allowed=visual_ids_mask(layout, device))
        seq = generate(model, prompt, N * hw, sampling, compile=s.compile, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    new = seq[:, prompt.shape[1]:].cpu().numpy()
    pred_codes = layout.ids_to_codes(new).reshape(len(items), N, h, w)

    report = {"settings": asdict(s), **(meta or {}), "tokens_per_frame": hw, "grid": [h, w],
              "generation": {"items": len(items), "new_tokens_per_item": N * hw, "seconds": round(gen_s, 3),
                             "tokens_per_s": round(len(items) * N * hw / gen_s, 1), "device": str(device)},
              "items": []}
    codes_out = {}
    for k, it in enumerate(items):
        forecast_frames = tokenizer.decode(pred_codes[k])  # (N, R, R, 3) uint8
        recon = tokenizer.decode(it.codes)  # (F, R, R, 3): context + continuation through the tokenizer
        real = it.frames
        rows = frame_scores(forecast_frames, None if real is None else real[C:], recon[C:], pred_codes[k],
                            it.codes[C:], None if real is None else real[C - 1], recon[C - 1], it.codes[C - 1])
        keys = [k2 for k2 in rows[0] if k2 != "frame"]
        item = {"name": it.name, "source": it.source, "per_frame": rows,
                "mean": {key: _mean([r[key] for r in rows]) for key in keys}}
        # context + forecast, for pictures: the context is shown as the tokenizer sees it
        shown = np.concatenate([recon[:C], forecast_frames])
        strip_rows = ([("real", real)] if real is not None else []) + [("tokenizer", recon), ("forecast", shown)]
        write_strip(out / f"{it.name}_strip.png", strip_rows, C)
        panels = ([real] if real is not None else []) + [recon, shown]
        video = side_by_side(panels, C)
        write_gif(out / f"{it.name}.gif", video, s.fps)
        files = {"strip": f"{it.name}_strip.png", "gif": f"{it.name}.gif"}
        try:
            item["mp4_codec"] = write_mp4(out / f"{it.name}.mp4", video, s.fps)
            files["mp4"] = f"{it.name}.mp4"
        except DataError as e:
            item["mp4_error"] = str(e)
        item["files"] = files
        item["panels"] = (["real"] if real is not None else []) + ["tokenizer", "forecast"]
        report["items"].append(item)
        codes_out[f"{it.name}.real"] = it.codes
        codes_out[f"{it.name}.forecast"] = pred_codes[k].astype(np.int64)
    with atomic_file(out / "codes.safetensors") as tmp:
        save_file(codes_out, str(tmp))
    atomic_write_json(out / "forecast.json", report)
    return report


def summary_table(report: dict) -> str:
    """A few lines for the terminal: mean scores per item."""
    lines = [f"{'item':<24}{'tok acc':>9}{'psnr':>8}{'ssim':>8}{'psnr/rec':>10}{'tok psnr':>10}{'copy psnr':>11}"]
    fmt = lambda v, n=8: f"{v:>{n}.3f}" if isinstance(v, float) else f"{'-':>{n}}"  # noqa: E731
    for it in report["items"]:
        m = it["mean"]
        lines.append(f"{it['name'][:23]:<24}{fmt(m['token_accuracy'], 9)}{fmt(m.get('psnr'))}{fmt(m.get('ssim'))}"
                     f"{fmt(m['psnr_recon'], 10)}{fmt(m.get('tokenizer_psnr'), 10)}{fmt(m.get('copy_last_psnr'), 11)}")
    g = report["generation"]
    lines.append(f"generated {g['items']} x {g['new_tokens_per_item']} tokens in {g['seconds']} s "
                 f"({g['tokens_per_s']} tokens/s on {g['device']})")
    return "\n".join(lines)
