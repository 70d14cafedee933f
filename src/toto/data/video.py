"""Exact-frame video decoding with PyAV, temporal striding and the square resize policy.

Policy (the same for every video and, up to the resampling filter, for images):
  * every frame is decoded in presentation order; container frame counts never decide what is
    decoded (an mp4/mov's frame index is only compared with what the file holds, to detect
    truncation); a file that is truncated or fails to decode half-way is a DataError;
  * frame ``n`` (0-based) is kept when ``n % stride == 0``;
  * a kept frame is scaled so its *short* side equals ``resolution`` (libswscale, area filter,
    aspect ratio kept, long side rounded), then the central ``resolution x resolution`` square
    is cropped (offset ``(long - resolution) // 2``). Grayscale and odd-sized frames are
    converted to RGB by the same call.

Clip policy (``clip_windows``): a video yields consecutive, non-overlapping windows of
``frames`` kept frames; kept frames after the last full window are dropped. A video with fewer
than ``frames`` kept frames (but at least one) is padded by repeating its last kept frame
(``short="pad"``, the default) or skipped (``short="skip"``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError

SHORT_POLICIES = ("pad", "skip")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")


def scaled_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the short side equal to ``resolution`` and the aspect ratio kept."""
    if width <= 0 or height <= 0:
        raise DataError(f"frame size {width}x{height} is not valid")
    s = min(width, height)
    w = max(resolution, round(width * resolution / s))
    h = max(resolution, round(height * resolution / s))
    return w, h


def center_crop(img: np.ndarray, resolution: int) -> np.ndarray:
    """``img: (H, W, C)`` with min(H, W) >= resolution -> ``(resolution, resolution, C)``."""
    h, w = img.shape[:2]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return img[top:top + resolution, left:left + resolution]


def frame_to_array(frame, resolution: int) -> np.ndarray:
    """PyAV ``VideoFrame`` (any pixel format and size) -> ``(R, R, 3) uint8``."""
    w, h = scaled_size(frame.width, frame.height, resolution)
    rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
    return np.ascontiguousarray(center_crop(rgb, resolution))


def iter_video(path: str | Path, stride: int = 4, resolution: int = 128,
               counts: dict | None = None) -> Iterator[np.ndarray]:
    """Yield kept frames ``(R, R, 3) uint8`` of one video, decoding every frame in order.

    Raises DataError (naming the file) when it cannot be opened, has no video stream, fails
    to decode, or holds no frame at all. ``counts["decoded"]`` (if given) tracks frames decoded.
    """
    import av

    path = Path(path)
    if stride < 1 or resolution < 1:
        raise DataError(f"{path}: stride and resolution must be >= 1 (got {stride}, {resolution})")
    _check_file(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot open as a video ({type(e).__name__}: {e})") from None
    n = 0
    try:
        if not container.streams.video:
            raise DataError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # threaded decoding hides decode errors: see _check_packet
        packets = 0
        try:
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                    _check_packet(path, packet, packets)
                for frame in packet.decode():
                    if n % stride == 0:
                        yield frame_to_array(frame, resolution)
                    n += 1
                    if counts is not None:
                        counts["decoded"] = n
        except (av.FFmpegError, OSError, ValueError) as e:
            raise DataError(f"{path}: decoding failed after {n} frames ({type(e).__name__}: {e})") from None
        if n == 0:
            raise DataError(f"{path}: no decodable video frames")
        declared = stream.frames if "mov" in container.format.name.split(",") else 0
        if packets < declared:  # an mp4/mov index lists every frame; a file cut at a packet boundary
            raise DataError(f"{path}: truncated file: its index lists {declared} frames, the file holds "
                            f"{packets}")
    finally:
        container.close()


def _check_packet(path: Path, packet, k: int) -> None:
    """Refuse a packet the demuxer could not read whole (a truncated or damaged file). With
    threaded decoding (``thread_type`` AUTO or FRAME) FFmpeg conceals the decode error such a
    packet causes and the file would be silently half-used; the demuxer's flag does not depend
    on the decoder, so checking it keeps threaded decoding's speed."""
    if packet.is_corrupt:
        raise DataError(f"{path}: truncated or corrupt data in frame packet {k} (byte {packet.pos})")


def read_video(path: str | Path, stride: int = 4, resolution: int = 128,
               max_frames: int | None = None) -> np.ndarray:
    """All kept frames (or the first ``max_frames``): ``frames: (T, R, R, 3) uint8``."""
    out = []
    for f in iter_video(path, stride, resolution):
        out.append(f)
        if max_frames is not None and len(out) >= max_frames:
            break
    return np.stack(out)


def frame_count_hint(path: str | Path) -> int | None:
    """The container's frame count without decoding (None when the container does not say,
    as WebM often does not); a hint only: the decoded count can differ."""
    import av

    try:
        with av.open(str(path)) as c:
            n = c.streams.video[0].frames if c.streams.video else 0
    except (av.FFmpegError, OSError, ValueError):
        return None  # iter_video reports the problem with the file
    return int(n) or None


def count_frames(path: str | Path) -> int:
    """Number of decodable frames (decodes everything; the container header is not used)."""
    import av

    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as c:
            return sum(1 for _ in c.decode(video=0))
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        raise DataError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None


def clip_windows(frames: Iterator[np.ndarray], length: int, short: str = "pad"):
    """Group kept frames into ``window: (length, R, R, 3)`` per the clip policy above.

    Yields ``(window, {"padded": p})`` for each window, then one final ``(None, stats)`` with
    the counts ``kept``, ``windows``, ``padded`` and ``dropped`` (frames after the last window,
    or all frames of a short video under ``short="skip"``).
    """
    if short not in SHORT_POLICIES:
        raise DataError(f"short-video policy must be one of {SHORT_POLICIES}, got {short!r}")
    buf: list[np.ndarray] = []
    n_kept = n_windows = 0
    for f in frames:
        n_kept += 1
        buf.append(f)
        if len(buf) == length:
            n_windows += 1
            yield np.stack(buf), {"padded": 0}
            buf = []
    padded = dropped = 0
    if n_windows == 0 and buf:
        if short == "pad":
            padded = length - len(buf)
            buf += [buf[-1]] * padded
            n_windows = 1
            yield np.stack(buf), {"padded": padded}
        else:
            dropped = len(buf)
    else:
        dropped = len(buf)
    yield None, {"kept": n_kept, "windows": n_windows, "padded": padded, "dropped": dropped}


def write_video(frames: np.ndarray, path: str | Path, fps: float = 4.0, lossless: bool = False,
                crf: int = 18) -> Path:
    """Write ``frames: (T, H, W, 3)`` or grayscale ``(T, H, W)`` uint8 as a video.

    Default: H.264 (yuv420p, H and W even) for viewing. ``lossless=True``: FFV1 (use .mkv/.avi),
    any size, gray or RGB kept bit-exact (tests rely on it to know decoded pixels exactly).
    """
    from fractions import Fraction

    import av

    path = Path(path)
    frames = np.asarray(frames)
    gray = frames.ndim == 3
    if frames.dtype != np.uint8 or not (gray or (frames.ndim == 4 and frames.shape[-1] == 3)):
        raise DataError(f"{path}: frames must be (T, H, W[, 3]) uint8, got {frames.shape} {frames.dtype}")
    if not lossless and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise DataError(f"{path}: H.264 needs even frame sizes, got {frames.shape[1]}x{frames.shape[2]}")
    if not fps > 0:  # FFmpeg would silently write 24 fps for 0
        raise DataError(f"{path}: frame rate must be > 0, got {fps}")
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(str(path), "w") as c:
        if lossless:
            s = c.add_stream("ffv1", rate=rate)
            s.pix_fmt = "gray" if gray else "bgr0"
        else:
            s = c.add_stream("libx264", rate=rate, options={"crf": str(crf)})
            s.pix_fmt = "yuv420p"
        s.height, s.width = frames.shape[1:3]
        for f in frames:
            img = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray" if gray else "rgb24")
            for pkt in s.encode(img):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path
