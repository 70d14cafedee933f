"""Scaling laws: a grid of (model shape, training budget) runs, their compute, the
compute-optimal frontier, and a power-law fit L(C) = a * C^b (optionally + L_inf).

Compute per run (FLOPs, forward + backward, one training token = one predicted position):

    C = 6 * N_nonembed * D  +  6 * n_layers * n_ctx * dim * D

(``toto.model.llama.flops_per_token``, the project's one FLOPs convention: Kaplan et al. 2020,
causal attention; its docstring says why). ``N_nonembed`` is every parameter except the input
embedding table. ``n_ctx`` is the length the model is trained on (shard seq_len - 1). ``D`` counts every
position of every micro-batch, the trainer's own token count.

Frontier: every validation point of every run (intermediate evaluations from its
metrics.jsonl and the final one) becomes (C at that step, val loss); a point is on the
frontier when no point with less or equal compute has a lower or equal loss (the running
minimum of loss over compute, i.e. the lower-left Pareto envelope). Intermediate points of a
cosine run are upper bounds of what a run ending there would reach, so the envelope is
conservative; ``--final-only`` keeps the end point of each run only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import (PRESETS, Config, DataConfig, ModelConfig, apply_dict, data_paths, preset, read_yaml_mapping,
                      validate)
from ..errors import ConfigError, DataError
from ..ioutil import atomic_write_bytes, atomic_write_json, read_jsonl, save_figure
from ..model.llama import flops_per_token, nonembedding_params

PAPER_EXPONENTS = {"Toto (paper)": -0.0378, "GPT-3": -0.048}
RESULTS = "results.jsonl"
SHAPE_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


# -- compute ----------------------------------------------------------------------------------
def tokens_per_step(cfg: Config, seq_len: int) -> int:
    """Tokens one optimizer step consumes: the trainer rounds batch_tokens to whole micro-batches."""
    t = cfg.train
    n_ctx = seq_len - 1
    accum = max(1, round(t.batch_tokens / (t.micro_batch_size * n_ctx)))
    return accum * t.micro_batch_size * n_ctx


# -- grid -------------------------------------------------------------------------------------
@dataclass
class Grid:
    """A sweep: every shape trained for every budget, from one base config."""

    path: str
    preset: str | None
    base: dict
    shapes: list[dict]  # each: ModelConfig fields + optional "name"
    budget_kind: str  # "steps" | "tokens"
    budgets: list[int]
    data: str | None = None


@dataclass
class RunSpec:
    name: str
    cfg: Config
    shape: dict
    steps: int
    tokens_per_step: int
    n_ctx: int
    flops_per_token: float = field(init=False)

    def __post_init__(self):
        self.flops_per_token = flops_per_token(self.cfg.model, self.n_ctx)


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    d = read_yaml_mapping(path, "scaling grid", "shapes and budgets")
    known = {"preset", "base", "shapes", "budgets", "data"}
    extra = set(d) - known
    if extra:
        raise ConfigError(f"{path}: unknown keys {sorted(extra)} (known: {', '.join(sorted(known))})")
    if d.get("preset") is not None and d["preset"] not in PRESETS:
        raise ConfigError(f"{path}: unknown preset {d['preset']!r} (available: {', '.join(PRESETS)})")
    base = d.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base must be a mapping of model/data/train sections")
    shapes = d.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise ConfigError(f"{path}: shapes must be a non-empty list of model shapes, e.g. "
                          f"- {{dim: 64, n_layers: 2, n_heads: 2, ffn_dim: 256}}")
    for i, s in enumerate(shapes):
        if not isinstance(s, dict):
            raise ConfigError(f"{path}: shapes[{i}] must be a mapping, got {s!r}")
        bad = set(s) - SHAPE_FIELDS - {"name"}
        if bad:
            raise ConfigError(f"{path}: shapes[{i}] has unknown fields {sorted(bad)} "
                              f"(model fields: {', '.join(sorted(SHAPE_FIELDS))})")
    b = d.get("budgets")
    if not isinstance(b, dict) or len(b) != 1 or next(iter(b)) not in ("steps", "tokens"):
        raise ConfigError(f"{path}: budgets must be one of 'steps: [..]' or 'tokens: [..]', got {b!r}")
    kind, values = next(iter(b.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: budgets.{kind} must be a non-empty list")
    clean = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if not (math.isfinite(f) and f > 0 and f.is_integer()):
            raise ConfigError(f"{path}: budgets.{kind} entries must be positive integers, got {v!r}")
        clean.append(int(f))
    data = d.get("data")
    return Grid(str(path), d.get("preset"), base, shapes, kind, clean, str(data) if data else None)


def _shape_name(shape: dict, m: ModelConfig) -> str:
    return str(shape["name"]) if "name" in shape else f"w{m.dim}_l{m.n_layers}"


def plan(grid: Grid, out_dir: str | Path, data: str | None = None) -> list[RunSpec]:
    """One validated config per (shape, budget); run folders are ``out_dir/runs/<name>``."""
    from ..data.mix import open_shards

    paths = data_paths(DataConfig(path=data or grid.data))  # one folder, "a,b", or a YAML list
    if not paths:
        raise ConfigError(f"{grid.path}: no data: set 'data:' in the grid or pass --data DIR")
    ds = open_shards(paths)
    seq_len = ds.seq_len
    specs, seen = [], {}
    for i, shape in enumerate(grid.shapes):
        for budget in grid.budgets:
            cfg = preset(grid.preset) if grid.preset else Config()
            apply_dict(cfg, grid.base, f"{grid.path}: base")
            model = {k: v for k, v in shape.items() if k != "name"}
            apply_dict(cfg, {"model": model}, f"{grid.path}: shapes[{i}]")
            tps = tokens_per_step(cfg, seq_len)
            steps = budget if grid.budget_kind == "steps" else max(1, round(budget / tps))
            name = f"{_shape_name(shape, cfg.model)}_s{steps}"
            if name in seen:
                raise ConfigError(f"{grid.path}: two runs share the name {name!r} (shapes[{seen[name]}] "
                                  f"and shapes[{i}]); give the shapes distinct 'name:' fields or budgets "
                                  f"that round to different step counts")
            seen[name] = i
            cfg.data.path, cfg.train.max_steps = ",".join(paths), steps
            cfg.train.out_dir = str(Path(out_dir) / "runs" / name)
            try:
                validate(cfg)
            except ConfigError as e:
                raise ConfigError(f"{grid.path}: run {name}: {e}") from None
            # filled here as the trainer would, so params and FLOPs are known before training
            cfg.model.vocab_size = cfg.model.vocab_size or ds.layout.vocab_size
            cfg.model.max_seq_len = cfg.model.max_seq_len or ds.seq_len
            specs.append(RunSpec(name, cfg, dict(shape), steps, tps, seq_len - 1))
    return specs


# -- running ----------------------------------------------------------------------------------
def _check_existing(spec: RunSpec, run_dir: Path) -> None:
    """Refuse to reuse a run folder that was trained with a different shape or length."""
    f = run_dir / "config.json"
    if not f.is_file():
        return
    try:
        saved = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None
    want = {("model", k): getattr(spec.cfg.model, k) for k in ("dim", "n_layers", "n_heads", "ffn_dim")}
    want[("train", "max_steps")] = spec.steps
    for (sec, k), v in want.items():
        got = saved.get(sec, {}).get(k)
        if got != v:
            raise ConfigError(f"{run_dir}: existing run has {sec}.{k}={got} but the grid asks for {v}; "
                              f"remove that folder or rename the shape")


def finished_summary(spec: RunSpec, run_dir: Path) -> dict | None:
    """The run's summary.json once it reached its budget (``fit(until=...)`` also writes one)."""
    f = run_dir / "summary.json"
    if not f.is_file():
        return None
    try:
        s = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e}); delete it to rerun the run's last stretch") from None
    return s if s.get("steps", 0) >= spec.steps else None


def result_record(spec: RunSpec, run_dir: Path, out_dir: Path) -> dict | None:
    """The results.jsonl line of a finished run (None while unfinished)."""
    s = finished_summary(spec, run_dir)
    if s is None:
        return None
    m = spec.cfg.model
    from ..model.llama import count_params

    return {
        "name": spec.name, "run_dir": str(run_dir.relative_to(out_dir)),
        "dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "ffn_dim": m.ffn_dim,
        "params": count_params(m), "params_nonembed": nonembedding_params(m),
        "steps": s["steps"], "tokens": s["tokens"], "tokens_per_step": spec.tokens_per_step,
        "n_ctx": spec.n_ctx, "flops_per_token": spec.flops_per_token,
        "flops": spec.flops_per_token * s["tokens"], "val_loss": s["val_loss"],
        "train_loss": s["train_loss"], "warmup_steps": spec.cfg.train.warmup_steps,
    }


def write_results(specs: list[RunSpec], out_dir: Path) -> list[dict]:
    recs = [r for sp in specs if (r := result_record(sp, out_dir / "runs" / sp.name, out_dir))]
    atomic_write_bytes(out_dir / RESULTS, "".join(json.dumps(r) + "\n" for r in recs).encode())
    return recs


def run_grid(specs: list[RunSpec], out_dir: str | Path, progress: bool = True, log=print) -> dict:
    """Train every run not yet finished (resuming from checkpoints); a diverged run is skipped,
    counted and reported. Returns counts and the collected records."""
    from tqdm import tqdm

    from ..errors import TrainingError
    from .checkpoint import latest_checkpoint
    from .trainer import Trainer

    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    done = trained = 0
    failed: dict[str, str] = {}
    for spec in tqdm(specs, desc="scaling runs", unit="run", disable=not progress):
        run_dir = out_dir / "runs" / spec.name
        _check_existing(spec, run_dir)
        if finished_summary(spec, run_dir) is not None:
            done += 1
            continue
        resume = latest_checkpoint(run_dir) is not None
        log(f"{spec.name}: {'resuming' if resume else 'training'} {spec.steps} steps x "
            f"{spec.tokens_per_step} tokens, {nonembedding_params(spec.cfg.model) / 1e6:.3f}M "
            f"non-embedding params, {spec.flops_per_token * spec.steps * spec.tokens_per_step:.3g} FLOPs")
        try:
            # no checkpoint yet: whatever a killed attempt left (metrics, config) is redone
            Trainer(copy.deepcopy(spec.cfg), resume=resume, overwrite=not resume, progress=progress).fit()
            trained += 1
        except TrainingError as e:
            failed[spec.name] = str(e)
            log(f"{spec.name}: skipped, {e}")
        write_results(specs, out_dir)
    recs = write_results(specs, out_dir)
    if failed:
        atomic_write_json(out_dir / "failed.json", failed)
    return {"skipped_finished": done, "trained": trained, "failed": failed, "records": recs}


# -- frontier ---------------------------------------------------------------------------------
def run_points(rec: dict, results_dir: Path, final_only: bool = False,
               include_warmup: bool = False) -> list[tuple[float, float, int]]:
    """(compute, val loss, step) of one run: its validation evaluations, or only the last."""
    pts = {}
    metrics = results_dir / rec["run_dir"] / "metrics.jsonl"
    if not final_only:
        for r in read_jsonl(metrics):
            if r.get("val_loss") is None or "step" not in r:
                continue
            if r["step"] < rec.get("warmup_steps", 0) and not include_warmup:
                continue  # the learning rate is still ramping up: not a fair point
            pts[r["step"]] = float(r["val_loss"])
    if rec.get("val_loss") is not None:
        pts[rec["steps"]] = float(rec["val_loss"])
    f = rec["flops_per_token"] * rec["tokens_per_step"]
    return sorted((f * s, v, s) for s, v in pts.items() if math.isfinite(v))


def frontier(points: list[tuple]) -> list[tuple]:
    """Points ``(compute, loss, ...)`` no other point beats with <= compute and <= loss."""
    best, out = math.inf, []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            out.append(p)
            best = p[1]
    return out


# -- fits -------------------------------------------------------------------------------------
def _loglog_slope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares line y = c + b x along the last axis (batched); NaN where x is constant."""
    mx, my = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
    sxx = ((x - mx) ** 2).sum(-1)
    sxy = ((x - mx) * (y - my)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(sxx > 1e-12 * max(1.0, float(np.max(sxx))), sxy / sxx, np.nan)
    return my[..., 0] - b * mx[..., 0], b


def _interval(samples: np.ndarray, level: float) -> list[float] | None:
    ok = samples[np.isfinite(samples)]
    if ok.size < 2:
        return None  # every resample failed: no interval (printed as n/a)
    lo, hi = np.percentile(ok, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def fit_power_law(C, L, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """L = a C^b by least squares on (ln C, ln L); ``b_ci`` is a percentile bootstrap over
    points (seeded); ``b_stderr`` is the ordinary least-squares standard error."""
    C, L = np.asarray(C, float), np.asarray(L, float)
    _validate_points(C, L, 3)
    x, y = np.log(C), np.log(L)
    c, b = _loglog_slope(x, y)
    n = len(x)
    resid = y - (c + b * x)
    stderr = math.sqrt(float((resid ** 2).sum()) / (n - 2) / float(((x - x.mean()) ** 2).sum()))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    _, bs = _loglog_slope(x[idx], y[idx])
    return {"model": "a*C^b", "a": float(math.exp(c)), "b": float(b), "b_ci": _interval(bs, level),
            "ci_level": level, "ci_method": f"percentile bootstrap over points ({n_boot} resamples, seed {seed})",
            "b_stderr": stderr, "n_points": n, "bootstrap_failed": int((~np.isfinite(bs)).sum()),
            "rmse_log": float(math.sqrt((resid ** 2).mean()))}


def _validate_points(C: np.ndarray, L: np.ndarray, need: int) -> None:
    if C.shape != L.shape or C.ndim != 1:
        raise DataError(f"compute and loss must be 1-D arrays of equal length, got {C.shape} and {L.shape}")
    if len(np.unique(C)) < need:
        raise DataError(f"need at least {need} points of distinct compute to fit, got {len(np.unique(C))}; "
                        f"add runs or evaluate more often (train.eval_interval)")
    if not (np.all(C > 0) and np.all(L > 0) and np.all(np.isfinite(C)) and np.all(np.isfinite(L))):
        raise DataError("compute and loss must be finite and > 0 for a log-log fit")


def _irreducible_once(x, L, p0):
    from scipy.optimize import curve_fit

    x0 = float(x.mean())

    def f(x, la, b, linf):  # centred at x0 so la and b are not strongly correlated
        return np.exp(la + b * (x - x0)) + linf

    lo = [-np.inf, -10.0, 0.0]
    hi = [np.inf, 0.0, float(L.min()) * (1 - 1e-9)]
    p0 = np.clip(p0, [-1e9, -10.0 + 1e-9, 0.0], [1e9, -1e-9, hi[2] * (1 - 1e-6)])
    p, cov = curve_fit(f, x, L, p0=p0, bounds=(lo, hi), max_nfev=5000)
    return p, cov, x0


def _irreducible_init(x, L):
    """Best straight line in log(L - L_inf) over a grid of L_inf below min(L)."""
    best = None
    for frac in np.linspace(0, 0.99, 100):
        linf = frac * L.min()
        c, b = _loglog_slope(x, np.log(L - linf))
        r = float(((np.exp(c + b * x) + linf - L) ** 2).sum())
        if np.isfinite(r) and b < 0 and (best is None or r < best[0]):
            best = (r, c, b, linf)
    if best is None:
        return np.array([math.log(max(L.mean() - 0.5 * L.min(), 1e-12)), -0.05, 0.5 * L.min()])
    _, c, b, linf = best
    return np.array([c + b * x.mean(), b, linf])


def fit_power_law_irreducible(C, L, n_boot: int = 500, seed: int = 0, level: float = 0.95) -> dict:
    """L = a C^b + L_inf by nonlinear least squares (scipy curve_fit, in ln C); ``*_ci`` are
    percentile bootstraps over points (seeded); ``*_stderr`` come from the fit's covariance."""
    C, L = np.asarray(C, float), np.asarray(L, float)
    _validate_points(C, L, 4)
    x = np.log(C)
    try:
        p, cov, x0 = _irreducible_once(x, L, _irreducible_init(x, L))
    except (RuntimeError, ValueError) as e:
        raise DataError(f"the fit L = a C^b + L_inf did not converge ({e}); try without --irreducible") from None
    la, b, linf = (float(v) for v in p)
    a = math.exp(la - b * x0)
    se = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    rng = np.random.default_rng(seed)
    boot, failed = [], 0
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) < 4:
            failed += 1
            continue
        try:
            q, _, x0b = _irreducible_once(x[i], L[i], p)
        except (RuntimeError, ValueError):
            failed += 1
            continue
        boot.append((math.exp(q[0] - q[1] * x0b), q[1], q[2]))
    boot = np.array(boot) if boot else np.full((1, 3), np.nan)
    resid = np.log(L) - np.log(a * C ** b + linf)
    return {"model": "a*C^b+L_inf", "a": a, "b": b, "L_inf": linf,
            "b_ci": _interval(boot[:, 1], level), "L_inf_ci": _interval(boot[:, 2], level),
            "a_ci": _interval(boot[:, 0], level), "ci_level": level,
            "ci_method": f"percentile bootstrap over points ({n_boot} resamples, seed {seed})",
            "b_stderr": float(se[1]), "L_inf_stderr": float(se[2]), "n_points": len(x),
            "bootstrap_failed": failed, "rmse_log": float(math.sqrt((resid ** 2).mean()))}


# -- the fit command's work -------------------------------------------------------------------
def load_results(path: str | Path) -> tuple[Path, list[dict]]:
    p = Path(path)
    f = p / RESULTS if p.is_dir() else p
    if not f.is_file():
        raise DataError(f"no scaling results at {p}: {f.name} not found (run `toto scaling run` first)")
    recs = read_jsonl(f)  # a bad line: DataError naming the file and line
    need = ("name", "run_dir", "flops_per_token", "tokens_per_step", "steps", "val_loss", "params")
    for i, r in enumerate(recs):
        miss = [k for k in need if k not in r]
        if miss:
            raise DataError(f"{f}: line {i + 1} lacks {miss}")
    return f.parent, recs


def analyse(results: str | Path, irreducible: bool = False, final_only: bool = False,
            include_warmup: bool = False, min_flops: float = 0.0, n_boot: int = 2000, seed: int = 0,
            level: float = 0.95) -> dict:
    rdir, recs = load_results(results)
    curves, skipped = {}, {}
    for r in recs:
        try:
            pts = run_points(r, rdir, final_only, include_warmup)
        except DataError as e:  # read_jsonl names the file and line
            skipped[r["name"]] = f"bad JSON line: {e}"
            continue
        if pts:
            curves[r["name"]] = pts
        else:
            skipped[r["name"]] = "no finite validation loss"
    allpts = [(c, l, name, s) for name, pts in curves.items() for c, l, s in pts if c >= min_flops]
    front = frontier(allpts)
    C = np.array([p[0] for p in front])
    L = np.array([p[1] for p in front])
    out = {"results": str(rdir / RESULTS), "n_runs": len(recs), "runs_without_points": skipped,
           "n_points": len(allpts), "points": "final only" if final_only else "all validation evaluations",
           "frontier": [{"flops": p[0], "val_loss": p[1], "run": p[2], "step": p[3]} for p in front],
           "power_law": fit_power_law(C, L, n_boot, seed, level), "reference_exponents": PAPER_EXPONENTS,
           "curves": {k: [[c, l] for c, l, _ in v] for k, v in curves.items()},
           "params": {r["name"]: r["params_nonembed"] if "params_nonembed" in r else r["params"] for r in recs}}
    if irreducible:
        out["power_law_irreducible"] = fit_power_law_irreducible(C, L, max(100, n_boot // 4), seed, level)
    return out


def _fmt_ci(ci) -> str:
    return "n/a (every bootstrap resample failed)" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def summary_lines(res: dict) -> list[str]:
    lines = [f"{res['n_runs']} runs, {res['n_points']} validation points ({res['points']}); "
             f"compute-optimal frontier: {len(res['frontier'])} points "
             f"(lowest loss at each compute: running minimum over compute)"]
    for name, why in res["runs_without_points"].items():
        lines.append(f"  skipped run {name}: {why}")
    for key in ("power_law", "power_law_irreducible"):
        fit = res.get(key)
        if not fit:
            continue
        pct = int(round(100 * fit["ci_level"]))
        extra = f" + {fit['L_inf']:.4f}" if "L_inf" in fit else ""
        lines.append(f"L(C) = {fit['a']:.4g} * C^{fit['b']:.4f}{extra}   exponent b = {fit['b']:.4f}, "
                     f"{pct}% CI {_fmt_ci(fit['b_ci'])} ({fit['ci_method']}); "
                     f"rms log residual {fit['rmse_log']:.4f}")
        if "L_inf" in fit:
            bound = " (at its bound 0: the frontier shows no flattening)" if fit["L_inf"] < 1e-6 else ""
            lines.append(f"  irreducible loss L_inf = {fit['L_inf']:.4f}, {pct}% CI "
                         f"{_fmt_ci(fit['L_inf_ci'])}{bound}")
        if fit["b_ci"] is None:
            continue
        lo, hi = fit["b_ci"]
        refs = []
        for name, ref in res["reference_exponents"].items():
            where = "inside our CI" if lo <= ref <= hi else ("steeper than our CI" if ref < lo
                                                             else "shallower than our CI")
            refs.append(f"{name} {ref} ({where})")
        lines.append("  compare: " + "; ".join(refs))
    lines.append("note: small or short runs (e.g. a CPU grid) are not expected to reproduce the paper's "
                 "exponent, which comes from models of 120M-1B parameters and ~1T tokens")
    return lines


def plot(res: dict, path: str | Path) -> None:
    """Loss vs compute (log-log): each run's validation curve, the frontier, the fit(s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = res["params"]
    lo, hi = math.log(min(sizes.values()) or 1), math.log(max(sizes.values()) or 1)
    cmap = plt.get_cmap("viridis")
    for name, pts in res["curves"].items():
        t = (math.log(sizes[name] or 1) - lo) / (hi - lo) if hi > lo else 0.5
        c, l = zip(*pts)
        ax.plot(c, l, "-", color=cmap(0.9 * t), alpha=0.6, lw=1, marker=".", ms=3)
    fc = [p["flops"] for p in res["frontier"]]
    fl = [p["val_loss"] for p in res["frontier"]]
    ax.plot(fc, fl, "o", mfc="none", mec="k", ms=7, label="frontier")
    grid = np.logspace(math.log10(min(fc)), math.log10(max(fc)), 100)
    f = res["power_law"]
    ax.plot(grid, f["a"] * grid ** f["b"], "--", color="tab:red",
            label=f"{f['a']:.3g} C^{f['b']:.4f}")
    g = res.get("power_law_irreducible")
    if g:
        ax.plot(grid, g["a"] * grid ** g["b"] + g["L_inf"], ":", color="tab:orange", lw=2,
                label=f"{g['a']:.3g} C^{g['b']:.4f} + {g['L_inf']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.LogNorm(
        vmin=max(min(sizes.values()), 1), vmax=max(max(sizes.values()), 2)))
    fig.colorbar(sm, ax=ax, label="non-embedding parameters")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    save_figure(fig, path)
