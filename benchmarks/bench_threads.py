"""CPU thread policy: the quickstart's training step (tiny preset, 4 x 1026-token sequences,
fwd + bwd + AdamW through the real trainer) with 1 and 2 torch threads and both
``OMP_WAIT_POLICY`` settings, on a quiet CPU and next to other CPU-bound jobs, in one run.

    python -m benchmarks.bench_threads            # ~3 min on 2 cores
    python -m benchmarks.bench_threads --quick

Each configuration runs in a fresh process (the OpenMP wait policy is read once, at start-up);
configurations alternate round by round, so load from outside hits them alike. "Contended"
starts ``--hogs`` busy processes (each a single-threaded fp32 matmul loop, like another
training job) for the duration of the measurement. Reported: the median step time, and the
ratio to the default policy (what ``toto`` does without ``--threads``) in the same condition.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common

WORKER = r"""
import json, sys, time
from pathlib import Path
import torch
from benchmarks.bench_trainer import run_trainer
res = run_trainer(Path(sys.argv[1]), Path(sys.argv[2]), "tiny", int(sys.argv[3]), torch.device("cpu"), False,
                  ["train.batch_tokens=4096", "train.micro_batch_size=4"])
print("RESULT " + json.dumps({"step_times_s": res["step_times_s"][1:], "threads": torch.get_num_threads()}))
"""


def _hog() -> None:  # another CPU job: single-threaded matmuls forever
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a @ a


def run_config(data: Path, out: Path, threads: int | None, policy: str | None, steps: int) -> list[float]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "TOTO_THREADS"):
        env.pop(k, None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join([str(common.RESULTS.parent.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", WORKER, str(data), str(out), str(steps)], env=env,
                       capture_output=True, text=True, cwd=common.RESULTS.parent.parent)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"worker failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(line[0][7:])["step_times_s"]


def main(argv=None) -> int:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds over all configurations (default 2)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round (default 4)")
    p.add_argument("--hogs", type=int, default=1, help="busy processes in the contended condition (default 1)")
    args = p.parse_args(argv)
    device = common.setup(args)
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    configs = {"default (torch: all cores)": (None, None), "1 thread": (1, None),
               "2 threads": (2, None), "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, "PASSIVE"),
               "1 thread, OMP_WAIT_POLICY=PASSIVE": (1, "PASSIVE")}
    times = {(cond, name): [] for cond in ("quiet", "contended") for name in configs}
    from benchmarks.bench_trainer import synthetic_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthetic_shards(tmp / "shards", 8, 16, (steps + 2) * 4 + 8)
        for r in range(rounds):
            for cond in ("quiet", "contended"):
                hogs = [mp.Process(target=_hog, daemon=True) for _ in range(args.hogs if cond == "contended" else 0)]
                for h in hogs:
                    h.start()
                try:
                    names = list(configs) if r % 2 == 0 else list(reversed(list(configs)))
                    for name in names:
                        t = run_config(data, tmp / f"{cond}_round{r}_{abs(hash(name))}",
                                       *configs[name], steps)
                        times[(cond, name)] += t
                        print(f"round {r} {cond:9s} {name:38s} median {statistics.median(t):.2f} s/step", flush=True)
                finally:
                    for h in hogs:
                        h.terminate()
                        h.join()
    rows, records = [], []
    for cond in ("quiet", "contended"):
        ref = statistics.median(times[(cond, "default (torch: all cores)")])
        for name in configs:
            t = times[(cond, name)]
            med = statistics.median(t)
            rows.append([cond, name, f"{med:.2f}", f"{min(t):.2f}", f"{max(t):.2f}", f"{ref / med:.2f}x"])
            records.append({"condition": cond, "config": name, "median_s": med, "times_s": t,
                            "speed_vs_default": ref / med})
    table = {"title": f"Thread policy: tiny training step (4 x 1026 tokens), quiet vs next to {args.hogs} busy "
                      f"process(es), {os.cpu_count()} cores",
             "columns": ["condition", "threads", "median s/step", "best", "worst", "speed vs default"],
             "rows": rows,
             "notes": ["Each configuration in its own process; configurations alternate per round. 'quiet' is only "
                       "as quiet as the machine was: other jobs may have been running."]}
    common.write_results("bench_threads", device, [table], records, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
