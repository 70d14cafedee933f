"""Generation speed: KV-cached vs uncached (recompute the prefix every step), and the time to
forecast 8 frames of 256 tokens after 4 context frames, for the tiny preset and a small model.

Both paths run the same sampling (temperature 1, visual ids only, seeded) on the same prompt
in the same run, interleaved, and must produce identical tokens; the ratio is their time ratio.

    python -m benchmarks.bench_forecast [--quick] [--device cpu] [--threads 1] [--out DIR]

On a CPU shared with other jobs use ``--threads 1``: with more OpenMP threads than free cores,
every small decode-step kernel waits for a descheduled thread and steps get ~100x slower.

Writes ``bench_forecast.json`` (the shared result protocol of ``benchmarks.common``) and
``bench_forecast.md`` next to it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import (base_parser, build_ours, machine, markdown_table, model_config, interleaved, setup,
                               sync, write_results)
from toto.model.generate import Sampling, generate, visual_ids_mask
from toto.vocab import VocabLayout

LAYOUT = VocabLayout()  # 8192 dVAE codes + 4 specials
TOKENS_PER_FRAME = 256  # 128 px frames, 16 x 16 codes
CONTEXT_FRAMES, FORECAST_FRAMES = 4, 8
SEQ_LEN = 2 + 16 * TOKENS_PER_FRAME  # 4098, as in pre-training

MODELS = {  # name -> (dim, n_layers, n_heads, ffn_dim)
    "tiny": (128, 4, 4, 512),  # the `tiny` preset
    "small": (384, 8, 6, 1536),  # a small model: 19M parameters in its blocks, 22M with the head
}


def prompt(batch: int, device) -> torch.Tensor:
    """``(batch, 1 + 4 * 256)``: video start + 4 context frames of random visual ids."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(LAYOUT.code_offset, LAYOUT.vocab_size, (batch, 1 + CONTEXT_FRAMES * TOKENS_PER_FRAME),
                        generator=g)
    ids[:, 0] = LAYOUT.video_start
    return ids.to(device)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated in the cached-vs-uncached comparison (default 16; 8 with --quick)")
    args = p.parse_args()
    device = setup(args)
    rounds = 1 if args.quick else 3
    n_cmp = args.new_tokens or (8 if args.quick else 16)
    allowed = visual_ids_mask(LAYOUT, device)
    sample = Sampling(temperature=1.0, seed=0, allowed=allowed)
    records, cmp_rows, fc_rows = [], [], []

    for name, (dim, layers, heads, ffn) in MODELS.items():
        cfg = model_config(dim, layers, heads, ffn, SEQ_LEN, vocab=LAYOUT.vocab_size)
        model = build_ours(cfg, device).eval()
        n_params = model.num_params(include_embedding=False)
        x = prompt(1, device)

        # cached vs uncached on the same work: prefill 1025 tokens, then n_cmp new tokens
        outs = {}
        fns = {"prefill": lambda: generate(model, x, 1, sample),
               "cached": lambda: outs.__setitem__("cached", generate(model, x, n_cmp, sample)),
               "uncached": lambda: outs.__setitem__("uncached", generate(model, x, n_cmp, sample, use_cache=False))}
        t = interleaved(fns, rounds, device)
        same = bool(torch.equal(outs["cached"], outs["uncached"]))
        tp, tc, tu = (t[k]["median_s"] for k in ("prefill", "cached", "uncached"))
        # after the first token (one full forward of the prompt on both paths), each further
        # token costs (t_N - t_1) / (N - 1): one cached step vs one recomputation of the prefix
        dc, du = max(tc - tp, 1e-9) / (n_cmp - 1), max(tu - tp, 1e-9) / (n_cmp - 1)
        rec = {"kind": "cached_vs_uncached", "model": name, "params_excl_token_embedding": n_params,
               "prompt_tokens": x.shape[1], "new_tokens": n_cmp, "rounds": rounds,
               "prefill_s": tp, "cached_s": tc, "uncached_s": tu, "cached_tokens_per_s": n_cmp / tc,
               "uncached_tokens_per_s": n_cmp / tu, "speedup": tu / tc,
               "cached_step_s": dc, "uncached_step_s": du, "step_speedup": du / dc, "identical_tokens": same,
               "times": {k: v["times_s"] for k, v in t.items()}}
        records.append(rec)
        cmp_rows.append([name, f"{n_params / 1e6:.1f}M", x.shape[1], n_cmp, f"{tp:.2f}", f"{n_cmp / tc:.1f}",
                         f"{n_cmp / tu:.2f}", f"{tu / tc:.1f}x", f"{1 / dc:.0f}", f"{1 / du:.2f}", f"{du / dc:.0f}x",
                         "yes" if same else "NO"])
        print(f"{name}: cached {n_cmp / tc:.1f} tok/s, uncached {n_cmp / tu:.2f} tok/s", flush=True)

        # forecasting 8 frames x 256 tokens after 4 context frames (cached); 1 and 4 videos at once
        for batch in ((1,) if args.quick else (1, 4)):
            xb = prompt(batch, device)
            n_new = FORECAST_FRAMES * TOKENS_PER_FRAME
            sync(device)
            t0 = time.perf_counter()
            generate(model, xb, n_new, sample)
            sync(device)
            secs = time.perf_counter() - t0
            records.append({"kind": "forecast", "model": name, "batch": batch, "prompt_tokens": xb.shape[1],
                            "new_tokens_per_video": n_new, "seconds": secs,
                            "tokens_per_s": batch * n_new / secs})
            fc_rows.append([name, batch, n_new, f"{secs:.1f}", f"{batch * n_new / secs:.0f}"])
            print(f"{name}: forecast {batch} x {n_new} tokens in {secs:.1f} s", flush=True)
        del model

    mach = machine(device)
    where = f"{mach['device']} ({mach['cpu'] if device.type == 'cpu' else mach.get('gpu')}, {mach['cpu_threads']} threads)"
    tables = [
        {"title": f"Cached vs uncached generation on {where}",
         "columns": ["model", "params (excl. tok. emb.)", "prompt", "new tokens", "prefill s", "cached tok/s",
                     "uncached tok/s", "speedup", "cached step tok/s", "uncached step tok/s", "step speedup",
                     "same tokens"],
         "rows": cmp_rows,
         "notes": [f"Median of {rounds} interleaved rounds of one generate() call each; 'tok/s' includes the "
                   "prompt's forward pass on both paths, 'step tok/s' = (N - 1) / (t_N - t_1) is the per-token "
                   "rate after it. Seeded sampling over visual ids (both paths must give the same tokens), "
                   "vocabulary 8196, context 4098."]},
        {"title": f"Forecasting {FORECAST_FRAMES} frames of {TOKENS_PER_FRAME} tokens after "
                  f"{CONTEXT_FRAMES} context frames (KV cache) on {where}",
         "columns": ["model", "videos", "new tokens / video", "seconds", "tokens/s (all videos)"],
         "rows": fc_rows,
         "notes": ["One timed run each (prefill of 1025 tokens included); model weights are random, which does not "
                   "change the cost."]},
    ]
    path = write_results("bench_forecast", device, tables, records, args.out)
    md = [f"# bench_forecast ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    for tb in tables:
        md += [f"## {tb['title']}", "", markdown_table(tb["columns"], tb["rows"]), ""] + \
              [n + "\n" for n in tb.get("notes", [])]
    Path(path).with_suffix(".md").write_text("\n".join(md))
    print(f"\nresults: {path} and {Path(path).with_suffix('.md')}")


if __name__ == "__main__":
    main()
