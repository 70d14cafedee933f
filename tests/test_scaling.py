import json

import numpy as np
import pytest
import torch

from conftest import write_shards
from toto.cli import main
from toto.config import ModelConfig
from toto.errors import ConfigError, DataError
from toto.train import scaling as sc
from toto.ioutil import read_jsonl


# -- FLOPs ------------------------------------------------------------------------------------
def test_flops_formula_hand_computed():
    m = ModelConfig(n_layers=2, n_heads=2, dim=8, ffn_dim=16, vocab_size=10, max_seq_len=16)
    # per layer: wqkv 8*24 + wo 8*8 + w13 8*32 + w2 16*8 + two norms 8 = 192+64+256+128+16 = 656
    # non-embedding: 2 layers 1312 + head 10*8 = 80 + final norm 8 = 1400
    assert sc.nonembedding_params(m) == 1400
    # 6 * 1400 + 6 * n_layers(2) * n_ctx(12) * dim(8) = 8400 + 1152
    assert sc.flops_per_token(m, 12) == 9552


def test_flops_match_torch_flop_counter():
    """torch's FLOP counter over a real forward+backward agrees with the formula: matmuls
    (mm) cost 6 x (non-embedding params without norm gains) per token, and the attention
    matmuls (bmm, dense over all T keys) cost exactly twice our causal term."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from toto.model.llama import Toto

    m = ModelConfig(n_layers=2, n_heads=2, dim=16, ffn_dim=32, vocab_size=20, max_seq_len=32)
    model = Toto(m)
    B, T = 2, 24
    x = torch.randint(0, 20, (B, T))
    # the math backend spells attention as bmm, which the counter sees (fused CPU kernels it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = model(x, x)
        loss.backward()
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    norms = (2 * m.n_layers + 1) * m.dim
    causal_attention = sc.flops_per_token(m, T) - 6 * sc.nonembedding_params(m)
    assert counts["aten.mm"] == 6 * (sc.nonembedding_params(m) - norms) * B * T
    assert counts["aten.bmm"] == 2 * causal_attention * B * T


# -- fits -------------------------------------------------------------------------------------
def synthetic(b=-0.05, a=30.0, n=25, noise=0.01, seed=0, lo=15, hi=21):
    rng = np.random.default_rng(seed)
    C = np.logspace(lo, hi, n)
    return C, a * C ** b * np.exp(noise * rng.standard_normal(n))


def test_power_law_exact_without_noise():
    C, L = synthetic(noise=0.0)
    f = sc.fit_power_law(C, L, n_boot=50)
    assert f["b"] == pytest.approx(-0.05, abs=1e-12) and f["a"] == pytest.approx(30.0, rel=1e-9)


def test_power_law_recovers_exponent_within_ci():
    C, L = synthetic(seed=3)
    f = sc.fit_power_law(C, L, n_boot=2000, seed=0)
    lo, hi = f["b_ci"]
    assert lo < -0.05 < hi
    assert hi - lo < 0.01  # the interval is informative, not vacuous
    assert abs(f["b"] + 0.05) < 4 * f["b_stderr"]


def test_power_law_interval_coverage():
    """Across many noisy data sets the 95% bootstrap interval holds the true exponent in most
    (percentile bootstrap on 25 points is a little narrow, so ask for >= 85%)."""
    hits = 0
    for s in range(60):
        C, L = synthetic(b=-0.0378, noise=0.02, seed=100 + s)
        lo, hi = sc.fit_power_law(C, L, n_boot=400, seed=s)["b_ci"]
        hits += lo <= -0.0378 <= hi
    assert hits >= 51


def test_irreducible_fit_recovers_a_b_linf():
    rng = np.random.default_rng(1)
    C = np.logspace(12, 20, 30)
    a, b, linf = 50.0, -0.12, 1.8
    clean = a * C ** b + linf
    f0 = sc.fit_power_law_irreducible(C, clean, n_boot=20)
    assert f0["b"] == pytest.approx(b, rel=1e-4) and f0["L_inf"] == pytest.approx(linf, rel=1e-4)
    assert f0["a"] == pytest.approx(a, rel=1e-3)
    noisy = clean * np.exp(0.002 * rng.standard_normal(len(C)))
    f = sc.fit_power_law_irreducible(C, noisy, n_boot=300, seed=0)
    assert f["b_ci"][0] < b < f["b_ci"][1]
    assert f["L_inf_ci"][0] < linf < f["L_inf_ci"][1]
    assert f["b"] == pytest.approx(b, rel=0.1) and f["L_inf"] == pytest.approx(linf, rel=0.05)
    # the pure power law cannot bend: it fits these points worse and shallower
    p = sc.fit_power_law(C, noisy, n_boot=50)
    assert p["rmse_log"] > 3 * f["rmse_log"] and p["b"] > b


def test_fit_refuses_too_few_points():
    with pytest.raises(DataError, match="at least 3"):
        sc.fit_power_law([1e10, 1e10, 1e11], [3.0, 2.9, 2.8])
    with pytest.raises(DataError, match="> 0"):
        sc.fit_power_law([1e10, 1e11, 1e12], [3.0, 0.0, 2.8])


# -- frontier ---------------------------------------------------------------------------------
def test_frontier_hand_made_curves():
    curves = {
        "A": [(1, 5.0), (2, 4.0), (4, 3.5)],
        "B": [(2, 4.5), (4, 3.2), (8, 2.9)],
        "C": [(4, 3.6), (8, 2.7), (16, 2.5), (32, 2.6)],
        "D": [(2, 4.0)],  # ties A at C=2 without beating it
    }
    pts = [(c, l, name) for name, cv in curves.items() for c, l in cv]
    got = sc.frontier(pts)
    assert [(c, l) for c, l, _ in got] == [(1, 5.0), (2, 4.0), (4, 3.2), (8, 2.7), (16, 2.5)]
    assert [p[2] for p in got][2:] == ["B", "C", "C"]


def test_run_points_warmup_and_final_only(tmp_path):
    (tmp_path / "r").mkdir()
    recs = [{"step": 5, "loss": 9.0, "tokens": 500}, {"step": 5, "val_loss": 4.0},
            {"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.5}]
    (tmp_path / "r" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rec = {"run_dir": "r", "flops_per_token": 7.0, "tokens_per_step": 100, "steps": 20,
           "val_loss": 2.5, "warmup_steps": 8}
    assert sc.run_points(rec, tmp_path) == [(7000.0, 3.0, 10), (14000.0, 2.5, 20)]
    assert sc.run_points(rec, tmp_path, include_warmup=True)[0] == (3500.0, 4.0, 5)
    assert sc.run_points(rec, tmp_path, final_only=True) == [(14000.0, 2.5, 20)]


# -- grid -------------------------------------------------------------------------------------
def _grid(tmp_path, text):
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("shapes: [{dim: 8}]\nbudgets: {epochs: [1]}\n", "budgets"),
    ("shapes: [{width: 8}]\nbudgets: {steps: [1]}\n", r"shapes\[0\] has unknown fields \['width'\]"),
    ("shapes: []\nbudgets: {steps: [1]}\n", "non-empty"),
    ("shapes: [{dim: 8}]\nbudgets: {steps: [0]}\n", "positive integers"),
    ("shapes: [{dim: 8}]\nbudgets: {steps: [1]}\nlr: 3\n", "unknown keys"),
])
def test_grid_errors_name_the_problem(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        sc.load_grid(_grid(tmp_path, text))


def test_plan_tokens_budget_and_bad_shape(tmp_path):
    data = write_shards(tmp_path / "d", n_seq=16)  # seq_len 18 -> n_ctx 17
    g = sc.load_grid(_grid(tmp_path, "preset: tiny\nbase: {train: {micro_batch_size: 4, batch_tokens: 68}}\n"
                                     "shapes: [{dim: 16, n_layers: 1, n_heads: 2, ffn_dim: 32}]\n"
                                     "budgets: {tokens: [680, 1400]}\n"))
    specs = sc.plan(g, tmp_path / "out", str(data))
    assert [s.tokens_per_step for s in specs] == [68, 68]  # one micro-batch of 4 sequences x 17 positions
    assert [s.steps for s in specs] == [10, 21] and [s.name for s in specs] == ["w16_l1_s10", "w16_l1_s21"]
    bad = sc.load_grid(_grid(tmp_path, "shapes: [{dim: 30, n_heads: 4}]\nbudgets: {steps: [5]}\n"))
    with pytest.raises(ConfigError, match="not divisible"):
        sc.plan(bad, tmp_path / "out", str(data))
    with pytest.raises(ConfigError, match="no data"):
        sc.plan(bad, tmp_path / "out", None)
    other = write_shards(tmp_path / "e", n_seq=16, seed=1)  # a mix of two folders plans like one
    mixed = sc.plan(g, tmp_path / "out", f"{data},{other}")
    assert [s.steps for s in mixed] == [10, 21] and mixed[0].cfg.data.path == f"{data},{other}"


# -- end to end -------------------------------------------------------------------------------
GRID = """
preset: tiny
base:
  train: {micro_batch_size: 4, batch_tokens: 68, warmup_steps: 2, eval_interval: 3, log_interval: 3,
          eval_batches: 2, ckpt_interval: 3, tensorboard: false, lr: 3.0e-3}
shapes:
  - {dim: 16, n_layers: 1, n_heads: 2, ffn_dim: 32}
  - {name: wide, dim: 32, n_layers: 2, n_heads: 2, ffn_dim: 64}
budgets:
  steps: [6, 12]
"""


@pytest.mark.slow
def test_run_and_fit_end_to_end(tmp_path, capsys):
    from toto.train.trainer import Trainer

    data = write_shards(tmp_path / "d", n_seq=48)
    grid = _grid(tmp_path, GRID)
    out = tmp_path / "sweep"
    # one run was interrupted at step 3 (checkpoint written): the sweep must resume it
    spec = {s.name: s for s in sc.plan(sc.load_grid(grid), out, str(data))}["wide_s12"]
    Trainer(spec.cfg, progress=False).fit(until=3)

    assert main(["scaling", "run", "--grid", str(grid), "--out", str(out), "--data", str(data),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wide_s12: resuming" in text and "4 trained" in text
    recs = {r["name"]: r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(recs) == ["w16_l1_s12", "w16_l1_s6", "wide_s12", "wide_s6"]
    for r in recs.values():
        summary = json.loads((out / r["run_dir"] / "summary.json").read_text())
        assert r["tokens"] == summary["tokens"] == r["steps"] * r["tokens_per_step"] == r["steps"] * 68
        assert r["flops"] == pytest.approx(r["flops_per_token"] * r["tokens"])
        m = ModelConfig(n_layers=r["n_layers"], n_heads=r["n_heads"], dim=r["dim"], ffn_dim=r["ffn_dim"],
                        vocab_size=36, max_seq_len=18)
        assert r["flops_per_token"] == 6 * sc.nonembedding_params(m) + 6 * r["n_layers"] * 17 * r["dim"]
    steps = [x["step"] for x in read_jsonl(out / "runs" / "wide_s12" / "metrics.jsonl") if "loss" in x]
    assert steps == [3, 6, 9, 12]  # resumed once, no step logged twice

    # rerun: everything finished, nothing retrained
    stamp = {n: (out / "runs" / n / "summary.json").stat().st_mtime_ns for n in recs}
    assert main(["scaling", "run", "--grid", str(grid), "--out", str(out), "--data", str(data),
                 "--no-progress"]) == 0
    assert "0 trained, 4 already finished" in capsys.readouterr().out
    assert stamp == {n: (out / "runs" / n / "summary.json").stat().st_mtime_ns for n in recs}

    assert main(["scaling", "fit", "--results", str(out), "--bootstrap", "200"]) == 0
    text = capsys.readouterr().out
    assert "exponent b =" in text and "-0.0378" in text and "-0.048" in text
    res = json.loads((out / "scaling_fit.json").read_text())
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    front = res["frontier"]
    assert len(front) >= 3 and all(a["flops"] < b["flops"] and a["val_loss"] > b["val_loss"]
                                   for a, b in zip(front, front[1:]))
    for p in front:  # each frontier point is a logged validation loss at that run's step
        r = recs[p["run"]]
        logged = {x["step"]: x["val_loss"] for x in read_jsonl(out / r["run_dir"] / "metrics.jsonl")
                  if "val_loss" in x}
        assert logged[p["step"]] == pytest.approx(p["val_loss"])
        assert p["flops"] == pytest.approx(r["flops_per_token"] * 68 * p["step"])
    fit = sc.fit_power_law([p["flops"] for p in front], [p["val_loss"] for p in front], n_boot=200)
    assert res["power_law"]["b"] == pytest.approx(fit["b"]) and fit["b"] < 0

    # a grid that changed a finished run's shape is refused, not silently mixed in
    grid.write_text(GRID.replace("ffn_dim: 64", "ffn_dim: 96"))
    assert main(["scaling", "run", "--grid", str(grid), "--out", str(out), "--data", str(data),
                 "--no-progress"]) == 2
    assert "model.ffn_dim=64 but the grid asks for 96" in capsys.readouterr().err


def test_fit_missing_results_is_a_clear_error(tmp_path, capsys):
    assert main(["scaling", "fit", "--results", str(tmp_path)]) == 2
    assert "results.jsonl not found" in capsys.readouterr().err


def test_dry_run_lists_runs_and_trains_nothing(tmp_path, capsys):
    data = write_shards(tmp_path / "d", n_seq=16)
    grid = _grid(tmp_path, GRID)
    assert main(["scaling", "run", "--grid", str(grid), "--out", str(tmp_path / "s"), "--data", str(data),
                 "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert all(n in text for n in ("w16_l1_s6", "w16_l1_s12", "wide_s6", "wide_s12"))
    assert not (tmp_path / "s").exists()


def test_fit_skips_and_reports_a_run_with_corrupt_metrics(tmp_path):
    recs = []
    for i, (name, loss) in enumerate([("a", 3.0), ("b", 2.6), ("c", 2.3), ("bad", 1.0)]):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"step": 10, "val_loss": loss + 0.5}), json.dumps({"step": 20, "val_loss": loss})]
        if name == "bad":
            lines.insert(1, '{"step": 15, "val_lo')  # a torn write
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        recs.append({"name": name, "run_dir": name, "flops_per_token": 10.0 ** (i + 1), "tokens_per_step": 1,
                     "steps": 20, "val_loss": loss, "params": 10 ** i, "warmup_steps": 0})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = sc.analyse(tmp_path, n_boot=50)
    assert list(res["runs_without_points"]) == ["bad"] and "bad JSON line" in res["runs_without_points"]["bad"]
    assert {p["run"] for p in res["frontier"]} == {"a", "b", "c"}
    assert any("skipped run bad" in line for line in sc.summary_lines(res))
