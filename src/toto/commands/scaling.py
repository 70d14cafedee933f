"""`toto scaling`: run a grid of model shapes x token budgets, then fit L(C) = a C^b."""

from __future__ import annotations

from pathlib import Path

from .argtypes import nonnegative_float, positive_int

HELP = "scaling laws: run a grid of model sizes and budgets, fit loss vs compute"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    r = sub.add_parser("run", help="train every (shape, budget) of a YAML grid; finished runs are skipped, "
                                   "interrupted ones resumed",
                       description="Train every (shape, budget) of a YAML grid (see configs/scaling_tiny.yaml) "
                                   "under OUT/runs/<name>; results go to OUT/results.jsonl.")
    r.add_argument("--grid", required=True, metavar="YAML", help="sweep definition (see docs/scaling.md)")
    r.add_argument("--out", required=True, metavar="DIR", help="sweep folder (runs/, results.jsonl)")
    r.add_argument("--data", metavar="DIR", help="token shard folder, or several as a,b (a weighted mix: set data.weights in the grid's base); overrides the grid's data:")
    r.add_argument("--dry-run", action="store_true", help="list the runs with params, tokens and FLOPs; train nothing")
    r.set_defaults(_locks_out=True)  # cli.main holds --out's lock while this runs

    f = sub.add_parser("fit", help="fit L(C) = a C^b to the compute-optimal frontier; JSON + plot",
                       description="Fit L(C) = a C^b (and optionally + L_inf) to the lowest validation loss "
                                   "at each compute level of a sweep.")
    f.add_argument("--results", required=True, metavar="DIR", help="sweep folder (or its results.jsonl)")
    f.add_argument("--irreducible", action="store_true", help="also fit L(C) = a C^b + L_inf")
    f.add_argument("--final-only", action="store_true",
                   help="use each run's final validation loss only (default: every evaluation)")
    f.add_argument("--include-warmup", action="store_true",
                   help="keep evaluations made during learning-rate warm-up (dropped by default)")
    f.add_argument("--min-flops", type=nonnegative_float, default=0.0, help="ignore points below this compute")
    f.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples for the interval")
    f.add_argument("--ci", type=float, default=0.95, help="confidence level of the interval")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    f.add_argument("--json", metavar="FILE", help="where to write the fit (default: DIR/scaling_fit.json)")
    f.add_argument("--plot", metavar="PNG", help="where to write the plot (default: DIR/scaling.png)")


def _run(args) -> int:
    from ..train import scaling as sc

    specs = sc.plan(sc.load_grid(args.grid), args.out, args.data)
    print(f"{len(specs)} runs:")
    print(f"  {'name':<22}{'params':>10}{'non-emb':>10}{'steps':>7}{'tokens':>12}{'FLOPs':>11}")
    from ..model.llama import count_params

    for s in specs:
        tokens = s.steps * s.tokens_per_step
        print(f"  {s.name:<22}{count_params(s.cfg.model):>10,}{sc.nonembedding_params(s.cfg.model):>10,}"
              f"{s.steps:>7}{tokens:>12,}{s.flops_per_token * tokens:>11.3g}")
    if args.dry_run:
        return 0
    out = sc.run_grid(specs, args.out, progress=not args.no_progress)
    print(f"done: {out['trained']} trained, {out['skipped_finished']} already finished, "
          f"{len(out['failed'])} failed; {len(out['records'])} results in {Path(args.out) / sc.RESULTS}")
    for name, err in out["failed"].items():
        print(f"  failed: {name}: {err}")
    return 1 if out["failed"] else 0


def _fit(args) -> int:
    from ..errors import ConfigError
    from ..train import scaling as sc
    from ..ioutil import atomic_write_json

    if not 0 < args.ci < 1:
        raise ConfigError(f"--ci must be in (0, 1), got {args.ci}")
    if args.bootstrap < 10:
        raise ConfigError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    res = sc.analyse(args.results, args.irreducible, args.final_only, args.include_warmup,
                     args.min_flops, args.bootstrap, args.seed, args.ci)
    for line in sc.summary_lines(res):
        print(line)
    rdir = Path(res["results"]).parent
    js = Path(args.json) if args.json else rdir / "scaling_fit.json"
    png = Path(args.plot) if args.plot else rdir / "scaling.png"
    atomic_write_json(js, res)
    sc.plot(res, png)
    print(f"wrote {js} and {png}")
    return 0


def run(args) -> int:
    return _run(args) if args.action == "run" else _fit(args)
