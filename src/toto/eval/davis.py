"""DAVIS-2017 semi-supervised metrics (J, F, J&F) and the DAVIS folder layout.

The metrics follow the official ``davis2017-evaluation`` code (re-implemented, not vendored;
its ``cv2.dilate`` is replaced by ``scipy.ndimage.binary_dilation`` with the same disk, which
is identical on binary images):

- J: IoU of the object's predicted and true masks, void pixels left out of both intersection
  and union; an empty union scores 1.
- F: boundary F-measure. Boundaries come from ``seg2bmap`` (1-pixel boundaries offset half a
  pixel towards the origin) of each mask with void pixels zeroed; a boundary pixel matches if
  the other boundary, dilated by a disk of radius ``ceil(0.008 * image diagonal)``, covers it.
- Per object: mean, recall (fraction of frames > 0.5), decay (mean of the first quarter of
  frames minus the last quarter, with the official bin edges); first and last frames excluded.
- J&F-Mean = (J-Mean + F-Mean) / 2, the means taken over all objects of all sequences.

One difference to know: the official loader turns void (255) into background *before* the
metrics, so its void masks are always empty. ``void="ignore"`` (our default, what the metric
functions intend) leaves void pixels out; ``void="background"`` reproduces the script's numbers
exactly. DAVIS-2017 480p annotations rarely contain 255, so the two agree on it in practice.

Layout::

    ROOT/JPEGImages/480p/<seq>/00000.jpg ...
    ROOT/Annotations/480p/<seq>/00000.png ...   indexed PNG: 0 background, 1..N objects, 255 void
    ROOT/ImageSets/2017/val.txt                 one sequence name a line
    results: OUT/<seq>/00000.png                indexed PNG with the DAVIS palette
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ioutil import read_lines

VOID = 255
BOUND_TH = 0.008


# ---------------------------------------------------------------- metrics (per frame)

def iou(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J of two binary masks ``(H, W)``; void pixels are left out."""
    gt, pred = _binary_pair(gt, pred)
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    inter = np.sum(gt & pred & keep)
    union = np.sum((gt | pred) & keep)
    return 1.0 if union == 0 else float(inter / union)


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map of a binary mask ``(H, W)``, as in the official code: a pixel
    is on the boundary if it differs from its right, lower or lower-right neighbour."""
    seg = np.asarray(seg).astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_tolerance(shape: tuple[int, int], bound_th: float = BOUND_TH) -> int:
    """Dilation radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def _disk(radius: int) -> np.ndarray:
    """skimage.morphology.disk: offsets with x^2 + y^2 <= r^2."""
    y, x = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y) <= radius * radius


def f_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
              bound_th: float = BOUND_TH) -> float:
    """Boundary F-measure of a binary prediction against a binary annotation ``(H, W)``."""
    from scipy.ndimage import binary_dilation

    gt, pred = _binary_pair(gt, pred)
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    radius = boundary_tolerance(gt.shape, bound_th)
    fg_b = seg2bmap(pred & keep)
    gt_b = seg2bmap(gt & keep)
    n_fg, n_gt = int(fg_b.sum()), int(gt_b.sum())
    if n_fg == 0 and n_gt == 0:
        return 1.0
    if n_fg == 0 or n_gt == 0:
        return 0.0  # precision or recall is 0, the other 1
    disk = _disk(radius)
    fg_dil = binary_dilation(fg_b, structure=disk) if radius > 0 else fg_b
    gt_dil = binary_dilation(gt_b, structure=disk) if radius > 0 else gt_b
    precision = np.sum(fg_b & gt_dil) / n_fg
    recall = np.sum(gt_b & fg_dil) / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def _binary_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt).astype(bool), np.asarray(pred).astype(bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"masks must be two (H, W) arrays of one shape, got {gt.shape} and {pred.shape}")
    return gt, pred


# ---------------------------------------------------------------- statistics (per object)

def db_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame scores, as the official ``db_statistics``
    (bin edges ``round(linspace(1, n, 5)) - 1``, neighbouring bins share their edge frame)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    # the official code casts the edges to uint8 (wrong beyond 256 frames); int64 here
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    return mean, recall, decay


@dataclass
class SequenceScores:
    """Per-object per-frame J and F of one sequence (first and last frames excluded)."""

    name: str
    j: np.ndarray  # (n_objects, n_frames - 2)
    f: np.ndarray  # (n_objects, n_frames - 2)

    def objects(self) -> list[dict]:
        out = []
        for i in range(self.j.shape[0]):
            jm, jr, jd = db_statistics(self.j[i])
            fm, fr, fd = db_statistics(self.f[i])
            out.append({"object": f"{self.name}_{i + 1}", "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                        "F-Mean": fm, "F-Recall": fr, "F-Decay": fd})
        return out

    def summary(self) -> dict:
        objs = self.objects()
        jm = float(np.mean([o["J-Mean"] for o in objs]))
        fm = float(np.mean([o["F-Mean"] for o in objs]))
        return {"sequence": self.name, "n_objects": len(objs), "J&F-Mean": (jm + fm) / 2,
                "J-Mean": jm, "F-Mean": fm}


def evaluate_sequence(name: str, gt: np.ndarray, pred: np.ndarray, n_objects: int | None = None,
                      void: str = "ignore", bound_th: float = BOUND_TH) -> SequenceScores:
    """Score ``pred: (T, H, W)`` label maps against ``gt: (T, H, W)`` (255 = void).

    Objects are ids 1..n_objects, n_objects defaulting to the largest id of the first ground-truth
    frame (as the official code counts them); the first and last frames are not scored.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3:
        raise DataError(f"{name}: predicted masks {pred.shape} do not match ground truth {gt.shape}")
    if void not in ("ignore", "background"):
        raise ValueError(f"void must be 'ignore' or 'background', got {void!r}")
    if n_objects is None:
        first = gt[0][gt[0] != VOID]
        n_objects = int(first.max()) if first.size else 0
    frames = range(1, gt.shape[0] - 1)
    j = np.zeros((n_objects, len(frames)))
    f = np.zeros((n_objects, len(frames)))
    for col, t in enumerate(frames):
        void_t = (gt[t] == VOID) if void == "ignore" else None
        for obj in range(1, n_objects + 1):
            g, p = gt[t] == obj, pred[t] == obj
            j[obj - 1, col] = iou(g, p, void_t)
            f[obj - 1, col] = f_measure(g, p, void_t, bound_th)
    return SequenceScores(name, j, f)


def overall(scores: list[SequenceScores]) -> dict:
    """The official global row: every statistic averaged over all objects of all sequences."""
    objs = [o for s in scores for o in s.objects()]
    if not objs:
        return {}
    keys = ["J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    out = {k: float(np.mean([o[k] for o in objs])) for k in keys}
    return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out, "n_objects": len(objs),
            "n_sequences": len(scores)}


# ---------------------------------------------------------------- palette PNGs

def davis_palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map ``(256, 3) uint8`` (index 1 = (128, 0, 0), ...)."""
    pal = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def read_mask(path: Path) -> np.ndarray:
    """An indexed (palette) or greyscale PNG -> label map ``(H, W) uint8``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(f"{path}: annotation must be an indexed (palette) PNG, got mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation ({e})") from None


def write_mask(path: Path, labels: np.ndarray) -> None:
    """Write ``labels: (H, W)`` as an indexed PNG with the DAVIS palette (atomically)."""
    import io

    from PIL import Image

    from ..ioutil import atomic_write_bytes

    im = Image.fromarray(np.asarray(labels, np.uint8), mode="P")
    im.putpalette(davis_palette().reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_frame(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read frame ({e})") from None


# ---------------------------------------------------------------- dataset layout

@dataclass
class Sequence:
    """One sequence: frame files in order and the annotation file of each frame (or None)."""

    name: str
    frames: list[Path]
    masks: list[Path | None] = field(default_factory=list)

    def load(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``frames: (T, H, W, 3) uint8``, ``first: (H, W) uint8`` labels of frame 0, and
        ``gt: (T, H, W) uint8`` when every frame is annotated (else None: not scored)."""
        if not self.frames:
            raise DataError(f"{self.name}: no frames")
        if self.masks[0] is None:
            raise DataError(f"{self.name}: no annotation for the first frame "
                            f"({self.frames[0].stem}.png missing)")
        frames = [read_frame(p) for p in self.frames]
        size = frames[0].shape
        for p, fr in zip(self.frames, frames):
            if fr.shape != size:
                raise DataError(f"{p}: frame size {fr.shape[1]}x{fr.shape[0]} differs from the "
                                f"sequence's first frame {size[1]}x{size[0]}")
        masks = [None if m is None else read_mask(m) for m in self.masks]
        for m_path, m in zip(self.masks, masks):
            if m is not None and m.shape != size[:2]:
                raise DataError(f"{m_path}: mask size {m.shape[1]}x{m.shape[0]} does not match its "
                                f"frame size {size[1]}x{size[0]}")
        if not np.any((masks[0] > 0) & (masks[0] != VOID)):
            raise DataError(f"{self.masks[0]}: the first-frame annotation has no objects (ids 1..254)")
        gt = np.stack(masks) if all(m is not None for m in masks) else None
        return np.stack(frames), masks[0], gt


def list_sequences(root: str | Path, subset: str = "val", resolution: str = "480p",
                   names: list[str] | None = None) -> list[Sequence]:
    """Sequences of a DAVIS-layout folder: ``names`` if given, else ImageSets/2017/<subset>.txt,
    else every folder under JPEGImages/<resolution>."""
    root = Path(root)
    img_root = root / "JPEGImages" / resolution
    ann_root = root / "Annotations" / resolution
    if not img_root.is_dir():
        raise DataError(f"{root}: not a DAVIS layout (missing {img_root.relative_to(root)})")
    if names is None:
        listing = root / "ImageSets" / "2017" / f"{subset}.txt"
        if listing.is_file():
            names = [ln.strip() for ln in read_lines(listing) if ln.strip()]
        else:
            names = sorted(p.name for p in img_root.iterdir() if p.is_dir())
    out = []
    for name in names:
        frames = sorted(p for p in (img_root / name).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not (img_root / name).is_dir():
            raise DataError(f"{img_root / name}: sequence {name!r} not found")
        masks = [(ann_root / name / f"{p.stem}.png") for p in frames]
        out.append(Sequence(name, frames, [m if m.is_file() else None for m in masks]))
    return out
