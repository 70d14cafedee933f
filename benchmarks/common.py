"""Helpers the benchmark scripts share: model pairs (ours and HF Llama with the same weights),
interleaved timing, FLOP counts, the machine's matmul peak, peak memory, and result files.

Result protocol (what ``benchmarks.run`` collects): a script ``bench_NAME.py`` writes
``benchmarks/results/bench_NAME.json`` = ``{"benchmark", "machine", "tables": [{"title",
"columns", "rows", "notes"}], "records": [...]}`` with ``write_results``. Scripts that write
nothing are still run; their exit code and last output lines go into the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 8196  # 8192 dVAE codes + 4 specials, as in real training data


# -- setup -------------------------------------------------------------------------------------

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="fewer timing rounds (a smoke run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result")
    return p


def setup(args) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def select_cases(parser: argparse.ArgumentParser, args, cases_by_device: dict) -> tuple[torch.device, dict, list[str]]:
    """The device, its cases, and the names ``--cases`` picked (all by default)."""
    device = setup(args)
    cases = cases_by_device[device.type]
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown} for {device.type}; known: {list(cases)}")
    return device, cases, names


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models ------------------------------------------------------------------------------------

def model_config(dim: int, n_layers: int, n_heads: int, ffn_dim: int, seq_len: int,
                 vocab: int = VOCAB, tie: bool = False):
    from toto.config import ModelConfig

    return ModelConfig(n_layers=n_layers, n_heads=n_heads, dim=dim, ffn_dim=ffn_dim,
                       vocab_size=vocab, max_seq_len=seq_len, tie_embeddings=tie)


def build_ours(cfg, device, seed: int = 0):
    from toto.model.llama import Toto

    torch.manual_seed(seed)
    return Toto(cfg).to(device)


def hf_from_ours(ours):
    """transformers.LlamaForCausalLM holding exactly our weights (via the exporter's mapping)."""
    import transformers

    from toto.model.export import hf_config, to_hf_state_dict

    sd, tie = to_hf_state_dict(ours)
    fields = {k: v for k, v in hf_config(ours.cfg, tie).items()
              if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (tie and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF model does not take our weights: missing {missing}, unexpected {unexpected}")
    return hf.to(next(ours.parameters()).device)


def build_pair(cfg, device, seed: int = 0, check: bool = True):
    """(ours, hf) with identical weights; ``check`` compares their logits once on a short input."""
    ours = build_ours(cfg, device, seed)
    hf = hf_from_ours(ours)
    if check:
        tokens = torch.randint(0, cfg.vocab_size, (1, min(32, cfg.max_seq_len)), device=device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # compare in true fp32, as the export test does
        try:
            with torch.no_grad():
                diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        if diff > 1e-3:
            raise RuntimeError(f"our logits and HF's differ by {diff:.2e}; the comparison would be unfair")
    return ours, hf


def logits_of(model, tokens):
    out = model(tokens)
    return out if torch.is_tensor(out) else out.logits


# -- the machine's peak (FLOPs per token: toto.model.llama.flops_per_token) --------------------------------------------------------------

def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                reps: int = 5) -> float:
    """Best achieved FLOP/s of an ``n x n`` matmul on this machine, now (the MFU denominator)."""
    n = n or (2048 if device.type == "cpu" else 8192)
    reps = reps if device.type == "cuda" else max(reps, 20)  # CPU: more chances of a quiet moment
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def conv_peak(device: torch.device, dtype: torch.dtype = torch.float32, reps: int = 5) -> float:
    """Best achieved FLOP/s of a big 3x3 convolution (256 -> 256 channels, 64x64, channels-last;
    the dVAE's most common shape) on this machine, now: the denominator of "fraction of peak"
    for convolutional nets, where a matmul's peak would flatter them."""
    n, c, hw = (4, 256, 64) if device.type == "cpu" else (64, 256, 64)
    x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    reps = reps if device.type == "cuda" else max(reps, 8)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.conv2d(x, w, padding=1)
        sync(device)
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n * hw * hw * c * c * 9 / best


# -- timing ------------------------------------------------------------------------------------

def interleaved(fns: dict, rounds: int, device: torch.device, warmup: int = 1) -> dict[str, dict]:
    """Time each callable ``rounds`` times, alternating between them, so that load from other
    processes on a shared machine hits every contender alike. Returns median and all times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            t = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": v} for k, v in times.items()}


def paired_speedup(timing: dict, impl: str, ref: str = "hf") -> float:
    """Median over rounds of ref time / impl time: each round's two steps ran back to back."""
    return statistics.median(r / i for r, i in zip(timing[ref]["times_s"], timing[impl]["times_s"]))


def best_speedup(timing: dict, impl: str, ref: str = "hf") -> float:
    """Ratio of the best (minimum) times: on a shared machine the fastest of several runs is
    the one least disturbed by other processes, so this compares what the code can do."""
    return timing[ref]["min_s"] / timing[impl]["min_s"]


# -- peak memory -------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(spec: dict, timeout: float = 600) -> dict:
    """Peak memory of one training setup, measured in a fresh process so that models and
    allocator caches of other contenders do not count. On CPU: peak RSS minus the RSS after
    imports (model, gradients, AdamW state, activations); on GPU: torch.cuda.max_memory_allocated."""
    cmd = [sys.executable, "-m", "benchmarks.common", "memory", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(RESULTS.parent.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_worker(spec: dict) -> dict:
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = model_config(**spec["model"])
    if device.type == "cpu":
        try:  # reset the RSS high-water mark so import-time peaks do not count
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        base = _rss_kib("VmRSS")
    ours = build_ours(cfg, device)
    model = ours if spec["impl"] == "ours" else hf_from_ours(ours)
    if spec["impl"] != "ours":
        del ours
    step = train_step_fn(model, spec["impl"], device, spec["batch"], cfg.max_seq_len, spec.get("dtype", "fp32"),
                         spec.get("checkpointing", False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(spec.get("steps", 2)):
        step()
    sync(device)
    if device.type == "cuda":
        return {"peak_bytes": torch.cuda.max_memory_allocated(device), "what": "cuda max_memory_allocated"}
    return {"peak_bytes": (_rss_kib("VmHWM") - base) * 1024, "what": "peak RSS above post-import RSS"}


def train_step_fn(model, impl: str, device, batch: int, seq_len: int, dtype: str = "fp32",
                  checkpointing: bool = False):
    """A closure doing one training step (forward, next-token NLL, backward, AdamW) on fixed
    random tokens. Both implementations get the same loss code (ours) on their logits and the
    same optimizer as pre-training (toto.train.optim: decay on matrices only; fused on CUDA)."""
    import torch.nn.functional as F

    from toto.config import Config
    from toto.train.optim import adamw, autocast_for, param_groups

    if impl == "ours":
        model.activation_checkpointing = checkpointing
    elif checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    t = Config().train
    opt = adamw(param_groups(model, t.weight_decay, getattr(model, "width_mult", 1.0)), device, t.lr, (t.beta1, t.beta2))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    x = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    y = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)
    forward = model

    def step():
        with autocast_for(device, dtype):
            logits = logits_of(forward, x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def set_forward(f):
        """Swap in another callable over the same parameters (e.g. torch.compile(model))."""
        nonlocal forward
        forward = f

    step.set_forward = set_forward
    return step


# -- results -----------------------------------------------------------------------------------

def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, device: torch.device, tables: list[dict], records: list[dict],
                  out: str | Path = RESULTS) -> Path:
    from toto.ioutil import atomic_write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    atomic_write_json(path, {"benchmark": name, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "machine": machine(device), "tables": tables, "records": records})
    print("\n" + tables_markdown(tables))
    return path


def tables_markdown(tables: list[dict]) -> str:
    """The tables of a result, each with its title and notes, as Markdown."""
    return "\n\n".join(f"### {t['title']}\n\n{markdown_table(t['columns'], t['rows'])}"
                       + "".join(f"\n\n{n}" for n in t.get("notes", [])) for t in tables) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "memory":
        print(json.dumps(_memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("usage: python -m benchmarks.common memory SPEC_JSON  (internal: peak-memory worker)")
