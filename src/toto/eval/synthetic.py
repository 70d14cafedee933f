"""A synthetic DAVIS-layout set: textured shapes moving over a textured background.

Every frame's true masks are known exactly, so tracking code can be checked end to end
without downloading DAVIS. Objects bounce off the borders and occlude each other in id order
(a higher id is drawn on top); each has its own colour and stripe texture, so pixel features
can tell them apart, and they move by several pixels a frame, so copying the first mask fails.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..ioutil import atomic_write_bytes
from . import davis


def _texture(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Smooth random colour field ``(h, w, 3) float`` in [0, 255]."""
    from PIL import Image

    small = (rng.random((*cells, 3)) * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(big + rng.normal(0, 6, (h, w, 3)), 0, 255)


def render_sequence(rng: np.random.Generator, n_frames: int, size: tuple[int, int], n_objects: int,
                    speed: float) -> tuple[np.ndarray, np.ndarray]:
    """``frames: (T, H, W, 3) uint8`` and ``labels: (T, H, W) uint8`` of one sequence."""
    H, W = size
    background = _texture(rng, H, W, (4, 6)) * 0.6 + 40  # muted, so objects stand out
    yy, xx = np.mgrid[0:H, 0:W]
    objs = []
    for i in range(n_objects):
        ry, rx = rng.uniform(0.12, 0.2) * H, rng.uniform(0.08, 0.14) * W
        pos = np.array([rng.uniform(ry, H - ry), rng.uniform(rx, W - rx)])
        angle = rng.uniform(0, 2 * np.pi)
        vel = speed * np.array([np.sin(angle), np.cos(angle)])
        colour = np.array(davis.davis_palette()[i + 1], np.float32) * 0.7 + rng.uniform(0, 70, 3)
        objs.append(dict(r=(ry, rx), pos=pos, vel=vel, colour=colour, box=i % 2 == 1,
                         period=rng.uniform(4, 8), phase=rng.uniform(0, 6)))
    frames = np.empty((n_frames, H, W, 3), np.uint8)
    labels = np.zeros((n_frames, H, W), np.uint8)
    for t in range(n_frames):
        img = background.copy()
        for i, o in enumerate(objs, start=1):
            (ry, rx), (cy, cx) = o["r"], o["pos"]
            dy, dx = (yy - cy) / ry, (xx - cx) / rx
            inside = (np.maximum(abs(dy), abs(dx)) <= 1) if o["box"] else (dy * dy + dx * dx <= 1)
            stripes = 0.8 + 0.2 * np.sin((xx - cx + yy - cy) / o["period"] + o["phase"])  # moves with it
            img[inside] = o["colour"] * stripes[inside, None]
            labels[t][inside] = i
            o["pos"] = o["pos"] + o["vel"]
            for ax, lim, r in ((0, H, ry), (1, W, rx)):  # bounce
                if not r <= o["pos"][ax] <= lim - r:
                    o["vel"][ax] *= -1
                    o["pos"][ax] = np.clip(o["pos"][ax], r, lim - r)
        frames[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return frames, labels


def make_synthetic_davis(root: str | Path, n_sequences: int = 3, n_frames: int = 16,
                         size: tuple[int, int] = (96, 160), n_objects: int = 2, speed: float = 4.0,
                         seed: int = 0) -> Path:
    """Write a DAVIS-2017-layout folder (JPEG frames, palette PNG masks, ImageSets/2017/val.txt)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"synth-{i:03d}" for i in range(n_sequences)]
    for name in names:
        frames, labels = render_sequence(rng, n_frames, size, n_objects, speed)
        img_dir = root / "JPEGImages" / "480p" / name
        ann_dir = root / "Annotations" / "480p" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            buf = io.BytesIO()
            Image.fromarray(frames[t]).save(buf, format="JPEG", quality=95)
            atomic_write_bytes(img_dir / f"{t:05d}.jpg", buf.getvalue())
            davis.write_mask(ann_dir / f"{t:05d}.png", labels[t])
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(root / "ImageSets" / "2017" / "val.txt", ("\n".join(names) + "\n").encode())
    return root
