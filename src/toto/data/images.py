"""Still images (PIL) with the same square policy as videos: short side to R, center crop.

The central square (side ``min(W, H)``, offset ``(long - short) // 2``) is cropped and resized
to ``R x R`` with PIL's antialiased bilinear filter; for video frames libswscale's area filter
does the scaling, so the two agree up to the resampling filter. Any PIL mode (L, P, RGBA, I;16,
CMYK...) is converted to RGB; an animated GIF contributes its first frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError


def to_8bit(img):
    """16-bit grayscale (``I;16*``, and ``I`` as Pillow opens 16-bit PNGs in some versions)
    scaled by its bit depth to 8-bit ``L`` (65535 -> 255); PIL's own conversion clips at 255
    instead, turning such images almost white. Other modes pass through."""
    from PIL import Image

    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    a = np.asarray(img).astype(np.float64)
    if img.mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"32-bit integer image with values in [{a.min():.0f}, {a.max():.0f}]: no known bit depth")
    return Image.fromarray(np.round(a * (255 / 65535)).astype(np.uint8))


def square_resize(img, resolution: int) -> np.ndarray:
    """PIL image -> ``(R, R, 3) uint8`` (center square crop, then resize)."""
    from PIL import Image

    img = to_8bit(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    if s <= 0:
        raise DataError(f"image size {w}x{h} is not valid")
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


def array_to_square(arr: np.ndarray, resolution: int) -> np.ndarray:
    """``(H, W) or (H, W, 3) uint8`` in-memory image -> ``(R, R, 3) uint8``."""
    from PIL import Image

    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise DataError(f"image array must be uint8, got {arr.dtype}")
    return square_resize(Image.fromarray(arr), resolution)


def read_image(path: str | Path, resolution: int = 128) -> np.ndarray:
    """One image file -> ``(R, R, 3) uint8``; DataError naming the file when unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            return square_resize(img, resolution)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt image data
        raise DataError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from None
