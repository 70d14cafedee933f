"""`toto coordcheck`: the muP coordinate check as a plot and JSON."""

from __future__ import annotations

from pathlib import Path

from .argtypes import positive_float, positive_int

LOCKS_OUT = True  # cli.main holds --out's lock while this runs
HELP = "muP coordinate check: activation size vs width under SP and muP (plot + JSON)"


def add_arguments(p):
    p.add_argument("--widths", default="32,64,128,256", help="comma-separated model widths")
    p.add_argument("--steps", type=positive_int, default=4, help="AdamW steps before measuring")
    p.add_argument("--lr", type=positive_float, default=1e-2)
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds averaged per width")
    p.add_argument("--out", default="runs/coordcheck", help="output folder")


def run(args) -> int:
    from ..errors import ConfigError
    from ..ioutil import atomic_write_json
    from ..train.coordcheck import coord_check, plot_coord_check

    try:
        widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        raise ConfigError(f"--widths must be comma-separated integers, got {args.widths!r}") from None
    if any(w % 16 for w in widths):
        raise ConfigError(f"--widths must be multiples of 16 (head width), got {widths}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = coord_check(widths, args.steps, args.lr, args.seeds)
    atomic_write_json(out / "coordcheck.json", {k: {str(w): v for w, v in r.items()} for k, r in result.items()})
    plot_coord_check(result, out / "coordcheck.png")
    lo, hi = widths[0], widths[-1]
    for name, per in result.items():
        ratios = {k: per[hi][-1][k] / per[lo][-1][k] for k in per[lo][-1]}
        print(f"{name.upper():>4} width {hi}/{lo}: " + "  ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    print(f"wrote {out / 'coordcheck.png'} and {out / 'coordcheck.json'}")
    return 0
