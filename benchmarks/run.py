"""Run every ``benchmarks/bench_*.py`` and gather their results into one Markdown table file.

    python -m benchmarks.run                  # all scripts, their defaults (CPU: ~3 min on 2 quiet cores)
    python -m benchmarks.run --quick          # passes --quick to scripts that accept it
    python -m benchmarks.run --only bench_model -- --device cuda   # args after -- go to the
                                                                   # scripts that take them

Each script runs in its own process. Scripts that follow the protocol in benchmarks/common.py
write ``results/<script>.json``; this runner renders those into ``results/latest.md`` and
``results/latest.json``. A script that fails, or writes nothing, is listed with its exit code
and last output lines, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, markdown_table  # noqa: E402


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def accepts(script: str, flag: str) -> bool:
    """Whether ``script`` takes ``flag``: named in its source, or in the shared parser it uses."""
    text = (HERE / f"{script}.py").read_text()
    if "base_parser" in text:
        text += (HERE / "common.py").read_text()
    return f'"{flag}"' in text


def args_for(script: str, extra: list[str]) -> list[str]:
    """The ``--flag [values]`` groups of ``extra`` that ``script`` mentions (so one command line
    can carry, say, bench_model's --nominal-peak-tflops without breaking the other scripts)."""
    groups: list[list[str]] = []
    for tok in extra:
        if tok.startswith("--") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return [t for g in groups if accepts(script, g[0].split("=", 1)[0]) for t in g]


def run_one(script: str, extra: list[str], quick: bool, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", f"benchmarks.{script}"]
    if quick and accepts(script, "--quick"):
        cmd.append("--quick")
    if accepts(script, "--out"):
        cmd += ["--out", str(out)]
    cmd += args_for(script, extra)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = out / f"{script}.json"
    before = result.stat().st_mtime if result.exists() else None
    print(f"== {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    log = out / f"{script}.log"  # written as the script runs, so a killed run keeps its output
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    secs = time.perf_counter() - t
    print(text, flush=True)
    fresh = result.exists() and result.stat().st_mtime != before
    return {"script": script, "exit": code, "seconds": round(secs, 1),
            "result": str(result.relative_to(ROOT) if result.is_relative_to(ROOT) else result) if fresh else None,
            "tail": None if fresh and code == 0 else text.strip().splitlines()[-5:]}


def render(summary: list[dict], out: Path) -> str:
    parts = [f"# Benchmark results\n\nMade by `python -m benchmarks.run` at "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n"]
    for s in summary:
        if s["result"]:
            data = json.loads((ROOT / s["result"]).read_text())
            m = data.get("machine", {})
            where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cpu_threads', '?')} threads"
            parts.append(f"## {s['script']} ({s['seconds']} s; {where}; torch {m.get('torch', '?')}, "
                         f"transformers {m.get('transformers', '-')})\n")
            for t in data.get("tables", []):
                parts.append(f"### {t['title']}\n\n{markdown_table(t['columns'], t['rows'])}\n")
                parts += [f"{n}\n" for n in t.get("notes", [])]
        else:
            tail = "\n".join(s["tail"] or [])
            parts.append(f"## {s['script']}: no result (exit {s['exit']}, {s['seconds']} s)\n\n```\n{tail}\n```\n")
    return "\n".join(parts)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="run all benchmarks/bench_*.py and tabulate their results")
    p.add_argument("--quick", action="store_true", help="pass --quick to scripts that take it")
    p.add_argument("--only", default=None, help="comma-separated script names (default: all)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scripts = args.only.split(",") if args.only else discover()
    missing = [s for s in scripts if not (HERE / f"{s}.py").is_file()]
    if missing:
        p.error(f"no such benchmark script(s): {missing}; found {discover()}")
    summary = [run_one(s, extra, args.quick, out, args.timeout) for s in scripts]

    from toto.ioutil import atomic_write_bytes, atomic_write_json

    atomic_write_json(out / "latest.json", {"runs": summary})
    md = render(summary, out)
    atomic_write_bytes(out / "latest.md", md.encode())
    print(f"wrote {out / 'latest.md'} and {out / 'latest.json'}")
    return 0 if all(s["exit"] == 0 for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
