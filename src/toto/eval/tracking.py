"""Semi-supervised video object segmentation by label propagation (DINO's protocol).

Per frame, a feature per grid cell (L2-normalised) comes from either

- ``ModelFeatures``: a frozen toto checkpoint's hidden states at one layer over the frame's
  tokens. ``context="image"`` feeds each frame alone as an image sequence ``[3] + codes``;
  ``context="video"`` feeds ``[1] + codes`` of up to ``video_frames`` frames ending at the
  frame (the causal model then sees the recent past, as in pre-training). The feature of a
  cell is the hidden state at that cell's own token position.
- ``PixelFeatures``: raw RGB patches of the resized frame, centred on the frame's mean colour
  (a model-free baseline).

Frames are resized before tokenizing: ``resize="square"`` to ``R x R`` (the grid the model
was pre-trained on, aspect ratio distorted; the default), or ``"keep-aspect"``: short side R,
long side rounded to a multiple of the patch size (854x480 at R=128 -> 224x128, a 28x16 grid).

Propagation, for frame t: the context is frame 0 with its ground-truth labels plus the
``n_last`` most recent frames with their predicted soft labels. Each query cell scores context
cells by cosine similarity / ``temperature``, only within a square neighbourhood of
``radius`` cells around its own position, keeps the ``topk`` best jointly over all context
frames, and takes the softmax-weighted average of their soft labels. Soft labels at the grid
are bilinearly upsampled to the image, each object's map rescaled to [0, 1] (DINO's
``norm_mask``) and the argmax taken.

The radius defaults to DINO's 12 cells at its 60-row grid (480p frames, 8-pixel patches)
scaled to ours: ``round(12 * min(h, w) / 60)``, at least 1 (3 cells on a 16x16 grid).
First-frame labels reach the grid by area averaging of the one-hot map (DINO uses nearest
sampling; on a 16x16 grid that can erase small objects).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..commands.argtypes import nonnegative_int, positive_float, positive_int
from ..config import option
from ..errors import ConfigError, DataError
from ..train.optim import autocast_for
from . import davis

DINO_RADIUS, DINO_ROWS = 12, 60


@dataclass
class PropagationConfig:
    n_last: int = option(7, "most recent predicted frames used as context (plus the first frame)",
                         type=nonnegative_int)
    topk: int = option(5, "neighbours kept jointly over the context", type=positive_int)
    temperature: float = option(0.1, "softmax temperature on cosine similarity", type=positive_float)
    radius: int | None = option(None, "neighbourhood radius in grid cells (default: DINO's 12 at 60 rows, "
                                      "scaled; 0 = off)", type=nonnegative_int)
    norm_mask: bool = option(True, "skip DINO's per-object rescaling before argmax")

    def validate(self) -> None:
        if self.n_last < 0 or self.topk < 1 or self.temperature <= 0:
            raise ConfigError(f"propagation settings out of range: n_last={self.n_last} (>= 0), "
                              f"topk={self.topk} (>= 1), temperature={self.temperature} (> 0)")
        if self.radius is not None and self.radius < 0:
            raise ConfigError(f"radius must be >= 0 (0 = no restriction), got {self.radius}")


def scaled_radius(grid: tuple[int, int]) -> int:
    return max(1, round(DINO_RADIUS * min(grid) / DINO_ROWS))


# ---------------------------------------------------------------- resizing

def target_size(hw: tuple[int, int], resolution: int, multiple: int, resize: str) -> tuple[int, int]:
    """Pixel size ``(H', W')`` a frame of size ``hw`` is resized to before featurising."""
    if resolution % multiple:
        raise ConfigError(f"resolution {resolution} is not a multiple of the patch size {multiple}")
    if resize == "square":
        return resolution, resolution
    if resize == "keep-aspect":
        h, w = hw
        long = max(multiple, int(round(resolution * max(h, w) / min(h, w) / multiple)) * multiple)
        return (resolution, long) if h <= w else (long, resolution)
    raise ConfigError(f"resize must be 'square' or 'keep-aspect', got {resize!r}")


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``frames: (T, H, W, 3) uint8`` -> ``(T, H', W', 3) uint8`` (PIL bilinear, antialiased)."""
    from PIL import Image

    if frames.shape[1:3] == tuple(size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.BILINEAR))
                     for f in frames])


# ---------------------------------------------------------------- features

class PixelFeatures:
    """Raw RGB patches as features: ``(T, h, w, p*p*3)``, centred on the frame's mean colour."""

    name = "pixels"

    def __init__(self, resolution: int = 128, patch: int = 8, resize: str = "square"):
        self.resolution, self.patch, self.resize = resolution, patch, resize
        target_size((1, 1), resolution, patch, resize)  # validate early

    def describe(self) -> dict:
        return {"features": "pixels", "resolution": self.resolution, "patch": self.patch, "resize": self.resize}

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        from ..tokenizers.patch import to_patches

        size = target_size(frames.shape[1:3], self.resolution, self.patch, self.resize)
        x = torch.from_numpy(resize_frames(frames, size)).float() / 255.0  # (T, H', W', 3)
        x = x - x.mean(dim=(1, 2), keepdim=True)
        return F.normalize(to_patches(x, self.patch), dim=-1)


class ModelFeatures:
    """Hidden states of a frozen toto model at ``layer`` for each frame's tokens; ``model`` and
    ``tokenizer`` as ``toto.eval.backbone.load_backbone`` checked them to belong together."""

    name = "model"

    def __init__(self, model, tokenizer, layer: int | None = None, context: str = "image",
                 video_frames: int = 4, resize: str = "square", batch_size: int = 16,
                 resolution: int | None = None, device: str | torch.device = "cpu"):
        self.model, self.tokenizer = model, tokenizer
        self.device = torch.device(device)
        n_layers = len(model.layers)
        self.layer = n_layers // 2 if layer is None else layer
        if not 0 <= self.layer <= n_layers:
            raise ConfigError(f"layer {self.layer} out of range 0..{n_layers} (0 = embeddings)")
        if context not in ("image", "video"):
            raise ConfigError(f"context must be 'image' or 'video', got {context!r}")
        if video_frames < 1:
            raise ConfigError(f"video_frames must be >= 1, got {video_frames}")
        self.context, self.video_frames, self.resize = context, video_frames, resize
        self.batch_size = batch_size
        self.resolution = resolution or tokenizer.resolution
        target_size((1, 1), self.resolution, tokenizer.downsample, resize)

    def describe(self) -> dict:
        return {"features": "model", "layer": self.layer, "context": self.context,
                "video_frames": self.video_frames if self.context == "video" else None,
                "resize": self.resize, "resolution": self.resolution,
                "tokenizer": self.tokenizer.identity(), "n_layers": len(self.model.layers)}

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        from ..vocab import CODE_OFFSET, IMAGE_START, VIDEO_START

        size = target_size(frames.shape[1:3], self.resolution, self.tokenizer.downsample, self.resize)
        codes = self.tokenizer.encode(resize_frames(frames, size))  # (T, h, w) int64
        T, h, w = codes.shape
        ids = torch.from_numpy(np.asarray(codes, np.int64) + CODE_OFFSET).reshape(T, h * w)
        per = 1 if self.context == "image" else self.video_frames
        need = 1 + per * h * w
        if need > self.model.cfg.max_seq_len:
            raise ConfigError(f"{per} frame(s) of {h}x{w} tokens need {need} positions, more than the "
                              f"model's context of {self.model.cfg.max_seq_len}; lower --video-frames "
                              f"or the resolution")
        out = torch.empty(T, h * w, self.model.cfg.dim)
        if self.context == "image":
            seqs = torch.cat([torch.full((T, 1), IMAGE_START), ids], dim=1)  # (T, 1 + h*w)
            for s in range(0, T, self.batch_size):
                out[s:s + self.batch_size] = self._hidden(seqs[s:s + self.batch_size])[:, 1:]
        else:
            for t in range(T):
                window = ids[max(0, t - per + 1):t + 1].reshape(1, -1)
                seq = torch.cat([torch.full((1, 1), VIDEO_START), window], dim=1)
                out[t] = self._hidden(seq)[0, -h * w:]
        return F.normalize(out.reshape(T, h, w, -1), dim=-1)

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        with autocast_for(self.device):
            x = self.model.hidden_states(tokens, [self.layer])[self.layer]
        return x.float().cpu()


# ---------------------------------------------------------------- propagation

def labels_to_grid(labels: np.ndarray, n_classes: int, grid: tuple[int, int]) -> torch.Tensor:
    """``labels: (H, W)`` ids (255 = void -> background) -> soft one-hot ``(C, h, w)`` by area."""
    lab = torch.from_numpy(np.where(labels == davis.VOID, 0, labels).astype(np.int64))
    onehot = F.one_hot(lab.clamp_max(n_classes - 1), n_classes).permute(2, 0, 1).float()
    return F.adaptive_avg_pool2d(onehot[None], grid)[0]


def propagate_frame(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, topk: int,
                    temperature: float, radius: int, band: int = 8) -> torch.Tensor:
    """Soft labels ``(C, h, w)`` of a frame from ``query: (h, w, D)``, context ``keys: (n, h, w, D)``
    and context ``labels: (n, C, h, w)``. Computed in bands of query rows, each against the context
    rows within ``radius`` (all rows when radius is 0), so memory stays small at 480p grids."""
    h, w, D = query.shape
    n, C = labels.shape[:2]
    out = torch.empty(h, w, C)
    lab = labels.permute(0, 2, 3, 1)  # (n, h, w, C)
    xs = torch.arange(w)
    for y0 in range(0, h, band):
        y1 = min(h, y0 + band)
        ky0, ky1 = (max(0, y0 - radius), min(h, y1 + radius)) if radius > 0 else (0, h)
        q = query[y0:y1].reshape(-1, D)                       # (Q, D)
        k = keys[:, ky0:ky1].reshape(-1, D)                   # (S, D), S = n * rows * w
        sim = (q @ k.T) / temperature                         # (Q, S)
        if radius > 0:
            qy = torch.arange(y0, y1).repeat_interleave(w)
            qx = xs.repeat(y1 - y0)
            ky = torch.arange(ky0, ky1).repeat_interleave(w).repeat(n)
            kx = xs.repeat((ky1 - ky0) * n)
            near = ((qy[:, None] - ky[None]).abs() <= radius) & ((qx[:, None] - kx[None]).abs() <= radius)
            sim = sim.masked_fill(~near, float("-inf"))
        val, idx = sim.topk(min(topk, sim.shape[1]), dim=1)  # jointly over all context frames
        weight = torch.softmax(val, dim=1)                    # -inf (outside) entries weigh 0
        src = lab[:, ky0:ky1].reshape(-1, C)                  # (S, C)
        out[y0:y1] = (weight[..., None] * src[idx]).sum(1).reshape(y1 - y0, w, C)
    return out.permute(2, 0, 1)


def propagate(feats: torch.Tensor, first: torch.Tensor, cfg: PropagationConfig,
              progress: bool = False) -> torch.Tensor:
    """``feats: (T, h, w, D)`` normalised, ``first: (C, h, w)`` -> soft labels ``(T, C, h, w)``."""
    from tqdm import tqdm

    T, h, w, _ = feats.shape
    radius = scaled_radius((h, w)) if cfg.radius is None else cfg.radius
    soft = torch.empty(T, *first.shape)
    soft[0] = first
    for t in tqdm(range(1, T), desc="frames", leave=False, disable=not progress):
        ctx = [0] + list(range(max(1, t - cfg.n_last), t))  # first frame + n most recent
        soft[t] = propagate_frame(feats[t], feats[ctx], soft[ctx], cfg.topk, cfg.temperature, radius)
    return soft


def soft_to_masks(soft: torch.Tensor, size: tuple[int, int], norm_mask: bool = True) -> np.ndarray:
    """``soft: (T, C, h, w)`` -> label maps ``(T, H, W) uint8`` (bilinear upsampling, argmax)."""
    out = np.empty((soft.shape[0], *size), np.uint8)
    for t in range(soft.shape[0]):
        up = F.interpolate(soft[t:t + 1], size=size, mode="bilinear", align_corners=False)[0]
        if norm_mask:
            lo = up.amin(dim=(1, 2), keepdim=True)
            hi = up.amax(dim=(1, 2), keepdim=True)
            scaled = (up - lo) / (hi - lo).clamp_min(1e-12)
            up = torch.where(hi > 0, scaled, up)  # DINO leaves an all-zero map alone
        out[t] = up.argmax(0).numpy().astype(np.uint8)
    return out


def track_sequence(frames: np.ndarray, first_labels: np.ndarray, features, cfg: PropagationConfig,
                   progress: bool = False) -> np.ndarray:
    """``frames: (T, H, W, 3)``, ``first_labels: (H, W)`` -> predicted labels ``(T, H, W) uint8``;
    ``features=None`` is the copy-the-first-mask baseline."""
    T, H, W = frames.shape[:3]
    valid = first_labels[first_labels != davis.VOID]
    n_classes = int(valid.max()) + 1 if valid.size else 1
    if features is None:
        pred = np.repeat(np.where(first_labels == davis.VOID, 0, first_labels)[None], T, 0)
        pred[0] = first_labels
        return pred.astype(np.uint8)
    feats = features(frames)  # (T, h, w, D)
    first = labels_to_grid(first_labels, n_classes, feats.shape[1:3])
    soft = propagate(feats, first, cfg, progress)
    pred = soft_to_masks(soft, (H, W), cfg.norm_mask)
    pred[0] = first_labels  # the given annotation is the first frame's answer
    return pred


# ---------------------------------------------------------------- a whole dataset

def overlay(frames: np.ndarray, labels: np.ndarray, alpha: float = 0.5, max_width: int = 480) -> list:
    """PIL images of frames with coloured masks blended in (for a gif)."""
    from PIL import Image

    pal = davis.davis_palette().astype(np.float32)
    out = []
    for fr, lab in zip(frames, labels):
        colour = pal[lab]
        obj = (lab > 0) & (lab != davis.VOID)
        blend = fr.astype(np.float32)
        blend[obj] = (1 - alpha) * blend[obj] + alpha * colour[obj]
        im = Image.fromarray(blend.round().astype(np.uint8))
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.BILINEAR)
        out.append(im)
    return out


def write_gif(path: Path, images: list, fps: int = 8) -> None:
    import io

    from ..ioutil import atomic_write_bytes

    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    atomic_write_bytes(path, buf.getvalue())


def run_tracking(root: str | Path, out: str | Path, features, cfg: PropagationConfig,
                 sequences: list[str] | None = None, subset: str = "val", void: str = "ignore",
                 overlay_sequence: str | None = "", progress: bool = True) -> dict:
    """Track every sequence, write masks (DAVIS results layout), per-sequence scores and
    ``results.json``. A sequence already scored with the same settings is reused (resumable);
    a sequence with bad input is skipped, counted and named in the results."""
    from tqdm import tqdm

    from ..ioutil import atomic_write_json

    cfg.validate()
    seqs = davis.list_sequences(root, subset=subset, names=sequences)
    out = Path(out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    settings = {**(features.describe() if features is not None else {"features": "copy-first"}),
                **asdict(cfg), "void": void}
    scored: list[davis.SequenceScores] = []
    skipped: dict[str, str] = {}
    unscored: list[str] = []
    if overlay_sequence == "" and seqs:
        overlay_sequence = seqs[0].name
    if overlay_sequence and overlay_sequence not in {s.name for s in seqs}:
        raise ConfigError(f"overlay sequence {overlay_sequence!r} is not among the sequences tracked")
    for seq in tqdm(seqs, desc="sequences", disable=not progress):
        score_file = out / "scores" / f"{seq.name}.json"
        if score_file.is_file():
            rec = json.loads(score_file.read_text())
            if rec.get("settings") == settings and (seq.name != overlay_sequence or
                                                    (out / f"overlay_{seq.name}.gif").is_file()):
                if rec["j"] is None:
                    unscored.append(seq.name)
                else:
                    scored.append(davis.SequenceScores(seq.name, np.array(rec["j"]), np.array(rec["f"])))
                continue
        try:
            frames, first, gt = seq.load()
            pred = track_sequence(frames, first, features, cfg, progress)
        except DataError as e:
            skipped[seq.name] = str(e)
            continue
        seq_dir = out / seq.name
        seq_dir.mkdir(exist_ok=True)
        for path, lab in zip(seq.frames, pred):
            davis.write_mask(seq_dir / f"{path.stem}.png", lab)
        if seq.name == overlay_sequence:
            write_gif(out / f"overlay_{seq.name}.gif", overlay(frames, pred))
        if gt is None:
            unscored.append(seq.name)
            rec = {"settings": settings, "j": None, "f": None}
        else:
            s = davis.evaluate_sequence(seq.name, gt, pred, void=void)
            scored.append(s)
            rec = {"settings": settings, "j": s.j.tolist(), "f": s.f.tolist()}
        atomic_write_json(score_file, rec)
    if not scored and not unscored:
        reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
        raise DataError(f"{root}: no sequence could be tracked ({len(skipped)} skipped: {reasons})")
    result = {"settings": settings, "overall": davis.overall(scored),
              "sequences": [s.summary() for s in scored],
              "objects": [o for s in scored for o in s.objects()],
              "skipped": skipped, "not_scored": unscored}
    atomic_write_json(out / "results.json", result)
    return result


def format_table(result: dict) -> str:
    """The per-sequence and overall J&F table, as the official script prints it."""
    rows = [f"{'sequence':<24}{'objects':>8}{'J&F':>8}{'J':>8}{'F':>8}"]
    for s in result["sequences"]:
        rows.append(f"{s['sequence']:<24}{s['n_objects']:>8}{s['J&F-Mean']:>8.3f}{s['J-Mean']:>8.3f}"
                    f"{s['F-Mean']:>8.3f}")
    o = result["overall"]
    if o:
        rows.append(f"{'overall':<24}{o['n_objects']:>8}{o['J&F-Mean']:>8.3f}{o['J-Mean']:>8.3f}{o['F-Mean']:>8.3f}")
        rows.append(f"J-Recall {o['J-Recall']:.3f}  J-Decay {o['J-Decay']:.3f}  "
                    f"F-Recall {o['F-Recall']:.3f}  F-Decay {o['F-Decay']:.3f}")
    if result["skipped"]:
        rows.append(f"skipped {len(result['skipped'])} sequence(s):")
        rows += [f"  {k}: {v}" for k, v in result["skipped"].items()]
    if result["not_scored"]:
        rows.append(f"not scored (ground truth incomplete): {', '.join(result['not_scored'])}")
    return "\n".join(rows)
