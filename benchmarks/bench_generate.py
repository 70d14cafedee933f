"""Greedy generation tokens/s: our static KV cache against HF ``generate`` with its cache.

Same weights, same prompt, timed in the same run (interleaved). Ours: ``toto.model.generate``
(greedy) when it is importable and gives the same tokens as the plain ``setup_cache`` +
``forward(tokens, input_pos=...)`` loop below, else that loop; "ours+compile" is a
``Generator(compile=True)`` kept across rounds. The greedy outputs of ours and HF are compared
token by token as a check that both do the same work.

    python -m benchmarks.bench_generate [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import time

import torch

from benchmarks import common

# name -> (model dims, batch, prompt length, new tokens) per device type
CASES = {
    "cpu": {
        "tiny": (dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512), 1, 64, 128),
        "base-width": (dict(dim=768, n_layers=2, n_heads=12, ffn_dim=3072), 1, 64, 64),
    },
    "cuda": {
        "tiny": (dict(dim=128, n_layers=4, n_heads=4, ffn_dim=512), 1, 256, 256),
        "base": (dict(dim=768, n_layers=12, n_heads=12, ffn_dim=3072), 1, 256, 256),
    },
}


@torch.no_grad()
def greedy_loop(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``prompt: (B, P)`` -> ``(B, P + new_tokens)``: one prefill pass, then one token a step."""
    B, P = prompt.shape
    model.setup_cache(B, P + new_tokens)
    try:
        nxt = model(prompt, input_pos=torch.arange(P, device=prompt.device))[:, -1].argmax(-1, keepdim=True)
        out = [prompt, nxt]
        for i in range(new_tokens - 1):
            nxt = model(nxt, input_pos=torch.tensor([P + i], device=prompt.device))[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
    finally:
        model.clear_cache()
    return torch.cat(out, dim=1)


def project_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from toto.model.generate import Sampling, generate

    return generate(model, prompt, new_tokens, Sampling(greedy=True))


@torch.no_grad()
def hf_greedy(hf, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all for the device)")
    p.add_argument("--rounds", type=int, default=None, help="timed generations per contender (default 5; 2 with --quick)")
    p.add_argument("--compile", default="all",
                   help="cases that also get an 'ours+compile' row (Generator(compile=True)): all | none | names")
    args = p.parse_args(argv)
    device, cases, names = common.select_cases(p, args, CASES)
    rounds = args.rounds or (2 if args.quick else 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    rows, records = [], []
    for name in names:
        dims, batch, prompt_len, new = cases[name]
        cfg = common.model_config(seq_len=prompt_len + new, **dims)
        ours, hf = common.build_pair(cfg, device)
        ours, hf = ours.to(dtype).eval(), hf.to(dtype).eval()
        hf.generation_config.eos_token_id = None  # always generate exactly `new` tokens
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).to(device)
        ref = greedy_loop(ours, prompt, new)
        ours_gen, via = greedy_loop, "setup_cache + forward(input_pos=) loop"
        try:
            if torch.equal(project_greedy(ours, prompt, new), ref):
                ours_gen, via = project_greedy, "toto.model.generate(greedy=True)"
            else:
                print("toto.model.generate gives other greedy tokens than the plain loop; timing the loop")
        except (ImportError, TypeError) as e:
            print(f"toto.model.generate not usable ({type(e).__name__}: {e}); timing the plain loop")
        theirs = hf_greedy(hf, prompt, new)
        agree = {"ours": 1.0, "hf": float((theirs[:, prompt_len:] == ref[:, prompt_len:]).float().mean())}
        contenders = {"ours": lambda: ours_gen(ours, prompt, new), "hf": lambda: hf_greedy(hf, prompt, new)}
        compile_s = None
        if args.compile == "all" or name in args.compile.split(","):
            from toto.model.generate import Generator, Sampling

            compiled_gen = Generator(ours, compile=True)

            def compiled():
                return compiled_gen(prompt, new, Sampling(greedy=True))

            t = time.perf_counter()
            try:
                got = compiled()  # compiles (and on CUDA records the graph)
                common.sync(device)
                compile_s = time.perf_counter() - t
                agree["ours+compile"] = float((got[:, prompt_len:] == ref[:, prompt_len:]).float().mean())
                contenders["ours+compile"] = compiled
            except Exception as e:  # inductor needs a working C++ compiler on CPU
                print(f"Generator(compile=True) failed on {device} ({type(e).__name__}: {e}); no compile row")
        timing = common.interleaved(contenders, rounds, device)
        ours.clear_cache()
        for impl, t in timing.items():
            tps = batch * new / t["min_s"]
            speedup = common.best_speedup(timing, impl)
            records.append(dict(case=name, impl=impl, batch=batch, prompt=prompt_len, new_tokens=new,
                                dtype=str(dtype), tokens_per_s=tps, seconds=t["min_s"], times_s=t["times_s"], speedup_vs_hf=speedup,
                                paired_median_speedup_vs_hf=common.paired_speedup(timing, impl),
                                greedy_agreement_with_ours=agree[impl],
                                compile_s=compile_s if impl == "ours+compile" else None,
                                via={"ours": via, "hf": "LlamaForCausalLM.generate"}.get(
                                    impl, "toto.model.generate.Generator(compile=True), greedy")))
            rows.append([name, impl, batch, prompt_len, new, f"{tps:,.1f}", f"{speedup:.2f}x",
                         f"{common.paired_speedup(timing, impl):.2f}x",
                         f"{100 * agree[impl]:.0f}%"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)

    table = {"title": f"Greedy generation with KV cache, {device.type}, {str(dtype).removeprefix('torch.')}",
             "columns": ["case", "model", "batch", "prompt", "new tokens", "tokens/s", "speed vs HF (best)", "(paired median)",
                         "same tokens"],
             "rows": rows,
             "notes": [f"tokens/s = batch x new tokens / wall time including the prefill, best of {rounds} "
                       f"interleaved runs; speed vs HF (best): HF's best time / ours; (paired median): median over "
                       f"rounds of HF's time / ours in the same round. Ours via "
                       f"{sorted({r['via'] for r in records if r['impl'] == 'ours'})}; HF via "
                       f"generate(do_sample=False, use_cache=True). 'same tokens': share of generated "
                       f"tokens equal to ours (eager); bf16 rounding can flip a near-tie and the tokens "
                       f"after it." +
                       "".join(f" {r['case']} ours+compile: first call (compilation) {r['compile_s']:.0f} s, "
                               f"{r['speedup_vs_hf'] / next(o['speedup_vs_hf'] for o in records if o['case'] == r['case'] and o['impl'] == 'ours'):.2f}x eager ours."
                               for r in records if r["impl"] == "ours+compile")]}
    common.write_results("bench_generate", device, [table], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
