"""A job's settings are declared once, on its dataclass (toto.config.option): the flag is in
--help, parses, is validated with one line naming it, reaches the job's config, and the same field
can be set from a --config YAML file or a `section.field=value` override."""

import dataclasses

import pytest

import toto.eval.forecast
import toto.eval.probe
import toto.eval.tracking
from toto.cli import main
from toto.eval.anticipation import StaConfig
from toto.eval.finetune import FinetuneConfig
from toto.eval.forecast import ForecastSettings
from toto.eval.probe import ProbeConfig
from toto.eval.tracking import PropagationConfig
from toto.robot.bc import BCConfig
from toto.tokenizers.train_dvae import DVAETrainConfig

PROBE = ["probe", "--checkpoint", "ck", "--tokenizer", "tok", "--data", "d", "--out"]


class Reached(Exception):
    """Raised by the stand-in job: carries what the command passed to it."""


def _capture(monkeypatch, module, name):
    def stand_in(*args, **kwargs):
        raise Reached(args, kwargs)

    monkeypatch.setattr(module, name, stand_in)


def _probe_config(monkeypatch, tmp_path, *extra) -> ProbeConfig:
    _capture(monkeypatch, toto.eval.probe, "ProbeJob")
    with pytest.raises(Reached) as e:
        main(PROBE + [str(tmp_path / "o"), *extra])
    return e.value.args[1]["probe"]


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@pytest.mark.parametrize("command,cls", [(["probe"], ProbeConfig), (["finetune"], FinetuneConfig),
                                         (["forecast"], ForecastSettings), (["track"], PropagationConfig),
                                         (["anticipate", "train"], StaConfig), (["robot", "train"], BCConfig),
                                         (["tokenizer", "train"], DVAETrainConfig)])
def test_every_declared_option_is_in_help(command, cls, capsys):
    assert main(command + ["--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside hyphenated words
    declared = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
    assert declared
    for f in declared:
        if f.metadata["help"] and not isinstance(f.default, bool):
            metavar = f.metadata.get("metavar", _flag(f)[2:].replace("-", "_").upper())
            assert _flag(f) + metavar in text or _flag(f) + "{" in text  # --lr LR, --norm {a,b}
            assert "".join(f.metadata["help"].split()) in text


def test_flags_overrides_and_yaml_reach_the_probe_config(monkeypatch, tmp_path):
    assert _probe_config(monkeypatch, tmp_path) == ProbeConfig()  # nothing given: the dataclass defaults
    cfg = _probe_config(monkeypatch, tmp_path, "--epochs", "3", "--probe-batch-size", "7", "--norm", "layernorm")
    assert (cfg.epochs, cfg.batch_size, cfg.norm) == (3, 7, "layernorm")
    # a field with no flag is reachable by an override, on either side of the options
    cfg = _probe_config(monkeypatch, tmp_path, "probe.min_lr_ratio=0.25", "--seed", "4", "probe.lr=2e-2")
    assert (cfg.min_lr_ratio, cfg.seed, cfg.lr) == (0.25, 4, 0.02)
    # precedence: defaults < YAML < overrides < flags
    y = tmp_path / "p.yaml"
    y.write_text("probe:\n  seed: 5\n  epochs: 9\n  heads: 2\n")
    cfg = _probe_config(monkeypatch, tmp_path, "--config", str(y), "probe.epochs=8", "--heads", "3")
    assert (cfg.seed, cfg.epochs, cfg.heads) == (5, 8, 3)


def test_other_jobs_get_their_settings(monkeypatch, tmp_path):
    _capture(monkeypatch, toto.eval.forecast, "load_for_forecast")
    with pytest.raises(Reached) as e:
        main(["forecast", "forecast.seed=none", "--checkpoint", "c", "--tokenizer", "t", "--data", "d",
              "--out", str(tmp_path), "--top-k", "5", "--greedy"])
    s = e.value.args[0][2]
    assert (s.top_k, s.greedy, s.seed, s.frames) == (5, True, None, ForecastSettings().frames)
    _capture(monkeypatch, toto.eval.tracking, "run_tracking")
    with pytest.raises(Reached) as e:
        main(["track", "--data", "d", "--out", str(tmp_path), "--features", "copy-first", "--no-norm-mask",
              "--radius", "0", "track.topk=2"])
    cfg = e.value.args[0][3]
    assert (cfg.norm_mask, cfg.radius, cfg.topk, cfg.n_last) == (False, 0, 2, PropagationConfig().n_last)


@pytest.mark.parametrize("extra,named", [
    (["--epochs", "0"], "--epochs"),                      # the flag's type, when parsed
    (["--lr", "fast"], "--lr"),
    (["--norm", "groupnorm"], "--norm"),
    (["probe.epochs=0"], "probe.epochs"),                 # the same check on an override
    (["probe.lr=fast"], "probe.lr"),
    (["probe.norm=groupnorm"], "norm"),                   # the dataclass's own validate()
    (["probe.nope=1"], "probe.nope"),
    (["train.lr=1"], "'train'"),                          # another job's section
    (["lr=1"], "lr=1"),
])
def test_bad_settings_are_one_line_naming_the_field(tmp_path, capsys, extra, named):
    assert main(PROBE + [str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_bad_yaml_value_names_file_and_field(tmp_path, capsys):
    y = tmp_path / "p.yaml"
    y.write_text("probe:\n  warmup_epochs: -1\n")
    assert main(PROBE + [str(tmp_path / "o"), "--config", str(y)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probe.warmup_epochs: must be >= 0, got -1" in err
    y.write_text("model:\n  dim: 3\n")
    assert main(PROBE + [str(tmp_path / "o"), "--config", str(y)]) == 2
    assert "unknown config section 'model'" in capsys.readouterr().err
