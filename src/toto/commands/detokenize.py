"""`toto detokenize`: decode one stored sequence back to frames (mp4/gif + PNG strip)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .argtypes import nonnegative_int, positive_float

HELP = "decode one sequence of a shard folder back to a video/gif and a PNG strip"


def add_arguments(p):
    p.add_argument("--data", required=True, metavar="DIR", help="token shard folder")
    p.add_argument("--tokenizer", required=True, metavar="FILE", help="the tokenizer the shards were built with")
    p.add_argument("--index", type=nonnegative_int, default=0, help="sequence index (default 0)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.mp4 (or .gif) and PREFIX.png; "
                   "a folder (an existing one, or a path ending in /) gets sequence_INDEX.mp4 and .png")
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4", help="animation format (default mp4)")
    p.add_argument("--fps", type=positive_float, default=4.0, help="frames per second of the animation (default 4)")


def decode_sequence(data: str | Path, tok, index: int) -> tuple[np.ndarray, str]:
    """Sequence ``index`` of a shard folder -> (``frames: (F, R, R, 3) uint8``, "video"|"image")."""
    from ..data.shards import ShardDataset
    from ..errors import DataError
    from ..tokenizers.base import check_identity

    ds = ShardDataset(data)
    stored = ds.index.get("tokenizer", {})
    if stored.get("n_codes") != tok.n_codes or tuple(ds.geometry.grid) != tuple(tok.grid):
        raise DataError(f"{data} was built with a tokenizer of {stored.get('n_codes')} codes and a "
                        f"{ds.geometry.grid[0]}x{ds.geometry.grid[1]} grid; {tok.kind} tokenizer has "
                        f"{tok.n_codes} codes and a {tok.grid[0]}x{tok.grid[1]} grid")
    check_identity(stored, tok, f"{data} (index.json)", DataError)
    if not 0 <= index < len(ds):
        raise DataError(f"{data} holds {len(ds)} sequences; --index {index} is out of range")
    seq = np.asarray(ds[index]).astype(np.int64)  # (seq_len,)
    lay = ds.layout
    kinds = {lay.video_start: "video", lay.image_start: "image"}
    if seq[0] not in kinds or seq[-1] != lay.end:
        raise DataError(f"{data}: sequence {index} does not start with a start token and end with {lay.end}")
    codes = lay.ids_to_codes(seq[1:-1]).reshape(ds.geometry.frames_per_sequence, *ds.geometry.grid)
    return tok.decode(codes), kinds[int(seq[0])]


def write_strip(frames: np.ndarray, path: str | Path) -> Path:
    """``frames: (F, R, R, 3)`` side by side in one PNG."""
    import io

    from PIL import Image

    from ..ioutil import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def write_animation(frames: np.ndarray, prefix: str | Path, fmt: str = "mp4", fps: float = 4.0) -> Path:
    from ..data.video import write_video
    from ..ioutil import atomic_file

    path = Path(f"{prefix}.{fmt}")
    with atomic_file(path) as tmp:
        if fmt == "gif":
            from PIL import Image

            imgs = [Image.fromarray(f) for f in frames]
            imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=round(1000 / fps), loop=0)
        else:
            write_video(frames, tmp, fps)
    return path


def output_prefix(out: str, index: int) -> Path:
    """``--out``: a file prefix, or a folder (existing, or written with a trailing slash) that
    gets ``sequence_INDEX`` files, never hidden ``.mp4``/``.png`` ones."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / f"sequence_{index}"
    return Path(out)


def run(args) -> int:
    from ..ioutil import file_lock
    from ..tokenizers.base import get_tokenizer

    prefix = output_prefix(args.out, args.index)
    with file_lock(prefix, "toto detokenize"):  # PREFIX.mp4/.png: one writer (cli.output_lock)
        tok = get_tokenizer(args.tokenizer)
        frames, kind = decode_sequence(args.data, tok, args.index)
        anim = write_animation(frames, prefix, args.format, args.fps)
        strip = write_strip(frames, f"{prefix}.png")
    print(f"sequence {args.index} ({kind}, {len(frames)} frames of {frames.shape[1]}x{frames.shape[2]}): "
          f"{anim}, {strip}")
    return 0
