"""Throughput of the real trainer (what `toto train` runs: the shard loader, gradient
accumulation to batch_tokens, autocast, AdamW, clipping, logging), eager against
``train.compile=true``, in the same run on the same synthetic token shards.

    python -m benchmarks.bench_trainer                 # CPU: tiny preset, 258-token sequences
    python -m benchmarks.bench_trainer --device cuda   # GPU: base preset, 4098-token sequences, 1M-token steps

The first step (compilation, allocator warm-up) is reported apart; tokens/s is the median over
the later steps, from the trainer's own metrics.jsonl.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import common

# name -> (preset, grid side, frames per sequence, timed steps, extra overrides)
CASES = {
    "cpu": {"tiny": ("tiny", 8, 4, 6, [])},
    "cuda": {"base": ("base", 16, 16, 4, [])},
}


def synthetic_shards(path: Path, grid: int, frames: int, n_seq: int, seed: int = 0) -> Path:
    """Random visual codes in real geometry (8192 codes; throughput does not depend on content)."""
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.vocab import VocabLayout

    layout = VocabLayout()
    w = ShardWriter(path, layout, ShardGeometry((grid, grid), frames), {"kind": "synthetic"},
                    sequences_per_shard=256, overwrite=True)
    rng = np.random.default_rng(seed)
    for _ in range(n_seq):
        w.add(layout.sequence(rng.integers(0, layout.n_codes, (frames, grid, grid)), "video"))
    w.close()
    return path


def run_trainer(data: Path, out: Path, preset: str, steps: int, device, compile_: bool, extra: list[str]) -> dict:
    from toto.config import build_config
    from toto.ioutil import read_jsonl
    from toto.train.trainer import Trainer

    cfg = build_config(preset, None, [f"data.path={data}", f"train.out_dir={out}", f"train.device={device.type}",
                                      "train.max_steps=1000000", "train.log_interval=1", "train.eval_interval=1000000",
                                      "train.ckpt_interval=1000000", "train.tensorboard=false",
                                      "data.val_fraction=0.0", "data.val_max_sequences=0",
                                      f"train.compile={str(compile_).lower()}", *extra])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tr = Trainer(cfg, progress=False)
    t0 = time.perf_counter()
    tr.fit(until=steps + 1)  # step 1: compilation / warm-up, not timed
    wall = time.perf_counter() - t0
    rec = [r for r in read_jsonl(out / "metrics.jsonl") if "tok_per_s" in r]
    step_s = [tr.tokens_per_step / r["tok_per_s"] for r in rec]
    result = {"tokens_per_step": tr.tokens_per_step, "accumulation": tr.accum, "first_step_s": step_s[0],
              "step_s": statistics.median(step_s[1:]), "step_times_s": step_s, "wall_s": wall,
              "final_loss": rec[-1]["loss"], "model": tr.cfg.model, "seq_tokens": tr.seq_tokens}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per mode (default per case)")
    args = p.parse_args(argv)
    from toto.model.llama import flops_per_token

    device, cases, names = common.select_cases(p, args, CASES)
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = common.matmul_peak(device, peak_dtype)
    rows, records = [], []
    for name in names:
        preset, grid, frames, steps, extra = cases[name]
        steps = args.steps or (2 if args.quick else steps)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            from toto.config import build_config

            probe = build_config(preset, None, extra)
            seq = 2 + frames * grid * grid
            per_step = max(1, round(probe.train.batch_tokens / (probe.train.micro_batch_size * (seq - 1))))
            n_seq = (steps + 2) * per_step * probe.train.micro_batch_size
            print(f"{name}: writing {n_seq} synthetic sequences of {seq} tokens", flush=True)
            data = synthetic_shards(tmp / "shards", grid, frames, n_seq)
            res = {}
            for mode in ("eager", "compile"):
                print(f"{name}: {mode}, {steps} timed steps", flush=True)
                res[mode] = run_trainer(data, tmp / mode, preset, steps, device, mode == "compile", extra)
        for mode, r in res.items():
            flops = flops_per_token(r["model"], r["seq_tokens"]) * r["tokens_per_step"]
            tps = r["tokens_per_step"] / r["step_s"]
            vs = res["eager"]["step_s"] / r["step_s"]
            mfu = flops / r["step_s"] / peak
            records.append(dict(case=name, preset=preset, mode=mode, seq_len=seq, tokens_per_s=tps, speedup_vs_eager=vs,
                                mfu=mfu, matmul_peak_flops=peak, **{k: v for k, v in r.items() if k != "model"}))
            rows.append([name, mode, f"{seq}", f"{r['tokens_per_step']:,}", str(r["accumulation"]),
                         f"{tps:,.0f}", f"{r['step_s']:.2f}", f"{vs:.2f}x", f"{100 * mfu:.1f}%",
                         f"{r['first_step_s']:.1f}", common.fmt_bytes(r.get("peak_bytes"))])
            print(" | ".join(rows[-1]), flush=True)
    table = {"title": f"Trainer throughput (toto train), {device.type}, eager vs train.compile=true",
             "columns": ["case", "mode", "seq", "tokens/step", "micro-batches", "tokens/s", "s/step",
                         "speed vs eager", "MFU", "first step (s)", "peak memory"],
             "rows": rows,
             "notes": [f"tokens/s: median over the timed steps (the first step, with compilation, is shown apart). "
                       f"MFU as in bench_model, against the measured {peak_dtype} matmul peak "
                       f"({peak / 1e9:,.1f} GFLOP/s, same run). Peak memory: torch.cuda.max_memory_allocated "
                       f"(GPU only). Data: random codes in 8192-code shards, so the loss is not meaningful."]}
    common.write_results("bench_trainer", device, [table], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
