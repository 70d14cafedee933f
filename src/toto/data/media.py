"""Finding media files and pooling frames from them (for fitting tokenizers).

Inputs may be folders (searched recursively), media files, or list files (``.txt``/``.lst``:
one path per line, ``#`` comments, relative paths resolved against the list's folder).
Files are recognised by extension (case-insensitive); the order is sorted and de-duplicated so
the same inputs always give the same order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ioutil import read_lines
from .images import read_image
from .video import iter_video

log = logging.getLogger("toto.data")

VIDEO_EXTS = frozenset({".mp4", ".webm", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".flv",
                        ".wmv", ".ogv", ".3gp", ".ts"})
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                        ".pgm"})
LIST_EXTS = frozenset({".txt", ".lst", ".list"})


def media_kind(path: str | Path) -> str | None:
    """'video', 'image' or None by extension."""
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def _read_list(path: Path) -> list[Path]:
    out = []
    for line in read_lines(path):
        line = line.split("#", 1)[0].strip()
        if line:
            p = Path(line).expanduser()
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def find_media(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Expand folders / files / list files -> ``(videos, images)``, each sorted and unique.

    A missing input or a list entry with an unknown extension is a DataError (a typo should
    not silently produce an empty data set); files of unknown type inside folders are ignored.
    Corrupt files are *not* detected here (decoding does that).
    """
    videos: set[Path] = set()
    images: set[Path] = set()

    def add(p: Path, strict: bool) -> None:
        kind = media_kind(p)
        if kind == "video":
            videos.add(p)
        elif kind == "image":
            images.add(p)
        elif strict:
            raise DataError(f"{p}: not a known video or image extension "
                            f"(videos: {', '.join(sorted(VIDEO_EXTS))}; images: {', '.join(sorted(IMAGE_EXTS))})")

    for inp in inputs:
        p = Path(inp).expanduser()
        if p.is_dir():
            for f in p.rglob("*"):
                if f.is_file() and not f.name.startswith("."):
                    add(f, strict=False)
        elif p.is_file() and p.suffix.lower() in LIST_EXTS:
            for q in _read_list(p):
                add(q, strict=True)  # missing listed files are found (and skipped) at decode time
        elif p.is_file():
            add(p, strict=True)
        else:
            raise DataError(f"{p}: input not found (expected a folder, a media file or a list file)")
    return sorted(videos), sorted(images)


def sample_frames(paths: list[Path], resolution: int, max_frames: int, seed: int = 0,
                  stride: int = 4) -> np.ndarray:
    """Pool up to ``max_frames`` frames ``(N, R, R, 3) uint8`` from videos and images.

    ``paths`` may be anything :func:`find_media` accepts. The budget is shared as evenly as the
    files allow (an image has one frame; a video offers its kept frames, every ``stride``-th,
    at most the first ``16 x ceil(max_frames / n_files)`` of them), so one long video does not
    dominate; each video's share is a seeded random subset. Unreadable files are skipped with a
    warning. The pooled frames are shuffled with ``seed``: deterministic given inputs and seed.
    """
    if max_frames < 1:
        raise DataError(f"max_frames must be >= 1, got {max_frames}")
    videos, images = find_media(paths)
    files = [(p, "video") for p in videos] + [(p, "image") for p in images]
    if not files:
        raise DataError(f"no videos or images found in {', '.join(map(str, paths))}")
    rng = np.random.default_rng(seed)
    if len(files) > max_frames:  # never read more files than frames wanted
        files = [files[i] for i in np.sort(rng.choice(len(files), size=max_frames, replace=False))]
    cap = 16 * max(1, math.ceil(max_frames / len(files)))  # kept frames decoded per video at most
    candidates: list[np.ndarray] = []  # per readable file: (n_i, R, R, 3)
    skipped = 0
    for path, kind in files:
        try:
            if kind == "image":
                candidates.append(read_image(path, resolution)[None])
                continue
            frames = []
            for f in iter_video(path, stride, resolution):
                frames.append(f)
                if len(frames) >= cap:
                    break
            candidates.append(np.stack(frames))
        except DataError as e:
            skipped += 1
            log.warning("skipping %s", e)
    # share the budget as evenly as the files allow (water-filling), then draw seeded subsets
    take = [0] * len(candidates)
    budget, order = max_frames, rng.permutation(len(candidates))
    while budget > 0:
        open_ = [i for i in order if take[i] < len(candidates[i])]
        if not open_:
            break
        for i in open_[:budget]:
            take[i] += 1
        budget -= min(budget, len(open_))
    pooled = [c[np.sort(rng.choice(len(c), size=t, replace=False))] for c, t in zip(candidates, take) if t]
    if not pooled:
        raise DataError(f"no readable frames in {len(files)} media files ({skipped} unreadable)")
    out = np.concatenate(pooled)  # (N, R, R, 3) uint8
    return out[rng.permutation(len(out))]
