"""Training-step throughput of our model against transformers.LlamaForCausalLM.

Same config, same weights, same random tokens, same loss code and optimizer, timed in the same
run with the contenders interleaved. One step = forward + next-token NLL + backward + AdamW.
Reports tokens/s, our speed over HF's, MFU (achieved FLOP/s over the machine's measured matmul
peak) and peak memory. Optional rows: ours under torch.compile, ours with activation
checkpointing.

    python -m benchmarks.bench_model                 # CPU: tiny + base-width (2 layers), T=256
    python -m benchmarks.bench_model --device cuda   # GPU: tiny + base preset, T=4096, bf16
"""

from __future__ import annotations

import time

import torch

from benchmarks import common

# name -> (model dims, batch, seq_len) per device type
CASES = {
    "cpu": {
        "tiny": (dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512), 8, 256),
        "base-width": (dict(dim=768, n_layers=2, n_heads=12, ffn_dim=3072), 2, 256),
    },
    "cuda": {
        "tiny": (dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512), 32, 256),
        "base": (dict(dim=768, n_layers=12, n_heads=12, ffn_dim=3072), 2, 4096),
    },
}


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per contender (default 7; 3 with --quick)")
    p.add_argument("--compile", default="tiny",
                   help="cases that also get an 'ours + torch.compile' row ('none' for no compile rows)")
    p.add_argument("--checkpointing", default="base-width,base",
                   help="cases that also get an 'ours + activation checkpointing' row ('none' for none)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16")
    p.add_argument("--nominal-peak-tflops", type=float, default=None,
                   help="the card's datasheet peak for this dtype (e.g. 989 for H100 SXM bf16 dense); "
                        "adds an MFU column against it")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = p.parse_args(argv)
    from toto.model.llama import flops_per_token

    device, cases, names = common.select_cases(p, args, CASES)
    rounds = args.rounds or (3 if args.quick else 7)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    peak_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    peak = common.matmul_peak(device, peak_dtype)
    print(f"measured {peak_dtype} matmul peak: {peak / 1e9:,.1f} GFLOP/s on {device}", flush=True)

    rows, records = [], []
    for name in names:
        dims, batch, seq = cases[name]
        cfg = common.model_config(seq_len=seq, **dims)
        ours, hf = common.build_pair(cfg, device)
        steps = {"ours": common.train_step_fn(ours, "ours", device, batch, seq, dtype),
                 "hf": common.train_step_fn(hf, "hf", device, batch, seq, dtype)}
        variants = {}  # extra rows: name -> (memory spec extras)
        compile_s = None
        if name in args.compile.split(","):
            twin = common.build_ours(cfg, device)
            steps["ours+compile"] = common.train_step_fn(twin, "ours", device, batch, seq, dtype)
            steps["ours+compile"].set_forward(torch.compile(twin))
            t = time.perf_counter()
            try:
                steps["ours+compile"]()  # compiles forward and backward graphs
                compile_s = time.perf_counter() - t
            except Exception as e:  # inductor needs a working C++ compiler on CPU
                print(f"torch.compile failed on {device} ({type(e).__name__}: {e}); no compile row")
                del steps["ours+compile"]
        if name in args.checkpointing.split(","):
            twin = common.build_ours(cfg, device)
            steps["ours+ckpt"] = common.train_step_fn(twin, "ours", device, batch, seq, dtype, checkpointing=True)
            variants["ours+ckpt"] = {"checkpointing": True}
        print(f"\n{name}: {ours.num_params() / 1e6:.1f}M params, batch {batch} x {seq} tokens, {dtype}, "
              f"{rounds} interleaved rounds of {list(steps)}", flush=True)
        timing = common.interleaved(steps, rounds, device)
        peak = max(peak, common.matmul_peak(device, peak_dtype))  # re-measured after each case
        tokens = batch * seq
        flops = flops_per_token(cfg, seq) * tokens
        for impl, t in timing.items():
            mem = None
            if not args.no_memory and impl != "ours+compile":
                spec = dict(impl="hf" if impl == "hf" else "ours", device=str(device), model=dict(seq_len=seq, **dims),
                            batch=batch, dtype=dtype, threads=torch.get_num_threads(), **variants.get(impl, {}))
                mem = common.peak_memory(spec)
            tps = tokens / t["min_s"]
            mfu = flops / t["min_s"] / peak
            speedup = common.best_speedup(timing, impl)
            vs_eager = common.best_speedup(timing, impl, ref="ours")
            rec = dict(case=name, impl=impl, params=ours.num_params(), batch=batch, seq_len=seq, dtype=dtype,
                       tokens_per_s=tps, step_s=t["min_s"], median_step_s=t["median_s"], step_times_s=t["times_s"],
                       speedup_vs_hf=speedup, paired_median_speedup_vs_hf=common.paired_speedup(timing, impl),
                       flops_per_step=flops, mfu=mfu, matmul_peak_flops=peak, memory=mem,
                       speedup_vs_ours_eager=vs_eager, compile_s=compile_s if impl == "ours+compile" else None)
            records.append(rec)
            peak_b = (mem or {}).get("peak_bytes")
            rows.append([name, impl, f"{tps:,.0f}", f"{t['min_s'] * 1e3:,.0f}", f"{speedup:.2f}x",
                         f"{common.paired_speedup(timing, impl):.2f}x",
                         f"{100 * mfu:.1f}%", common.fmt_bytes(peak_b)])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        del ours, hf, steps

    # the MFU denominator: the best matmul timing of the run (start and after each case), since
    # other processes on a shared machine can depress any one of them
    for rec, row in zip(records, rows):
        rec["mfu"] = rec["flops_per_step"] / rec["step_s"] / peak
        rec["matmul_peak_flops"] = peak
        row[6] = f"{100 * rec['mfu']:.1f}%"
        if args.nominal_peak_tflops:
            rec["mfu_nominal"] = rec["flops_per_step"] / rec["step_s"] / (args.nominal_peak_tflops * 1e12)
            row.insert(7, f"{100 * rec['mfu_nominal']:.1f}%")
    mem_note = ("peak RSS above the post-import RSS of a fresh process doing 2 steps" if device.type == "cpu"
                else "torch.cuda.max_memory_allocated of a fresh process doing 2 steps")
    table = {
        "title": f"Training step (forward + backward + AdamW), {device.type}, {dtype}",
        "columns": ["case", "model", "tokens/s", "ms/step", "speed vs HF (best)", "(paired median)", "MFU"] +
                   ([f"MFU vs {args.nominal_peak_tflops:g} TFLOP/s"] if args.nominal_peak_tflops else []) +
                   ["peak memory"],
        "rows": rows,
        "notes": [f"MFU = (6N + 6*L*d*T) FLOPs per token x tokens/s / measured {peak_dtype} matmul peak "
                  f"({peak / 1e9:,.1f} GFLOP/s, {2048 if device.type == 'cpu' else 8192}^2 matmul, same run); "
                  f"N = non-embedding parameters (toto.model.llama.flops_per_token). Memory: {mem_note}. "
                  f"tokens/s and ms/step: best of {rounds} interleaved steps (the least disturbed by other "
                  f"processes); speed vs HF (best): HF's best step time / this row's; (paired median): median "
                  f"over rounds of HF's time / this row's in the same round." +
                  "".join(f" {r['case']} {r['impl']}: {r['speedup_vs_ours_eager']:.2f}x the speed of eager ours"
                          + (f", first step (compilation) {r['compile_s']:.0f} s" if r["compile_s"] else "") + "."
                          for r in records if r["impl"].startswith("ours+"))],
    }
    common.write_results("bench_model", device, [table], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
