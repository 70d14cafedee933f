import json
import re
from pathlib import Path

import numpy as np
import pytest

from toto.cli import main
from toto.data.samples import moving_digits, write_digit_folders
from toto.report import plot_loss


def test_moving_digits_move_and_bounce():
    rng = np.random.default_rng(0)
    clip = moving_digits(60, size=48, n_digits=1, digit_px=16, rng=rng)
    assert clip.shape == (60, 48, 48, 3) and clip.dtype == np.uint8
    ys = [np.argwhere(f.max(-1) > 40).mean(0) for f in clip]  # centre of the bright pixels
    steps = np.linalg.norm(np.diff(ys, axis=0), axis=1)
    assert 0.3 < np.median(steps) < 3.0  # it moves, smoothly
    # it bounces instead of leaving the canvas: the digit stays whole in every frame
    ink = [(f.max(-1) > 40).sum() for f in clip]
    assert min(ink) > 0.8 * max(ink)


def test_digit_folders_split(tmp_path):
    root = write_digit_folders(tmp_path / "d", size=16, val_fraction=0.25)
    train = list((root / "train").rglob("*.png"))
    val = list((root / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797 and len(val) == round(1797 * 0.25)
    assert {p.name for p in train}.isdisjoint({p.name for p in val})
    assert sorted(d.name for d in (root / "train").iterdir()) == [str(i) for i in range(10)]


def test_loss_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "loss": 5 - s / 10, "tokens": 100 * s} for s in range(1, 11)] + [{"step": 10, "val_loss": 4.2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert plot_loss(run, tmp_path / "loss.png", uniform=5.5)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_loss(tmp_path, tmp_path / "none.png")


@pytest.mark.slow
def test_quickstart_end_to_end_and_reuse(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out relative to the working directory, as a user types it
    out = tmp_path / "runs" / "qs"
    args = ["quickstart", "--out", "runs/qs", "--moving-digits", "6", "--steps", "4", "--probe-epochs", "2",
            "--probe-max-per-class", "4", "--finetune-epochs", "2", "--cater-clips", "0", "--no-progress"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    # every image link resolves relative to the report itself, not to where the command ran
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(links) >= 7, links
    for link in links:
        assert not Path(link).is_absolute() and (out / link).is_file(), link
    for section in ("## Data", "## Tokenizer", "## Pre-training", "## Attentive probing", "## Fine-tuning",
                    "## Label-propagation", "## Forecasting"):
        assert section in report, section
    for fig in ("figures/loss.png", "figures/reconstructions.png", "probe/probe.png", "finetune/finetune.png"):
        assert (out / fig).is_file(), fig
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["steps"] == 4
    probe = json.loads((out / "probe" / "results.json").read_text())
    assert set(probe["models"]) == {"trained", "random_init"} and probe["n_classes"] == 10
    ft = json.loads((out / "finetune" / "results.json").read_text())
    assert ft["layer"] == probe["models"]["trained"]["best"]["layer"] and len(ft["epochs"]) == 2
    track = json.loads((out / "track_pixels" / "results.json").read_text())
    assert 0 <= track["overall"]["J&F-Mean"] <= 1
    capsys.readouterr()
    # a second run reuses every finished stage
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("(done; reused)") == 8, log


def test_paper_presets_probe_online_and_resume(tmp_path):
    """At paper scale a feature cache does not fit (500 GB a layer for ImageNet), so the probe
    stage runs `toto probe --online`, resuming its saved state; the tiny preset keeps the cache."""
    from toto.quickstart import Quickstart, QuickstartOptions

    def stage_args(opts):
        qs = Quickstart(opts, log=lambda *a: None)
        calls = []
        qs._cli = lambda *argv: calls.append([str(a) for a in argv])
        qs.stage_probe()
        return qs, calls[0]

    paper = QuickstartOptions(out=tmp_path / "p", preset="base", videos=["clip.mp4"], probe_data=str(tmp_path))
    qs, argv = stage_args(paper)
    assert argv[0] == "probe" and "--online" in argv and "--resume" not in argv
    (qs.paths["probe"] / "online_state").mkdir(parents=True)
    assert "--resume" in stage_args(paper)[1]
    assert "--online" not in stage_args(QuickstartOptions(out=tmp_path / "t"))[1]


def test_cli_defaults_are_the_options_defaults():
    """`toto quickstart` with no flags runs QuickstartOptions' defaults: the flags take them from
    the dataclass, so the two cannot drift apart (the CATER clip count once did: 80 vs 48)."""
    import dataclasses

    from toto.cli import build_parser
    from toto.quickstart import QuickstartOptions

    args = build_parser().parse_args(["quickstart"])
    defaults = QuickstartOptions()
    for f in dataclasses.fields(QuickstartOptions):
        if f.name == "progress":
            continue
        assert hasattr(args, f.name), f.name
        got = Path(args.out) if f.name == "out" else getattr(args, f.name)
        assert got == getattr(defaults, f.name), (f.name, got, getattr(defaults, f.name))
