"""The one resumable-job helper (toto.jobstate): a changed setting is refused naming the field
and both values, records logged after the last saved state are trimmed, a damaged state file is
one line naming it."""

from __future__ import annotations

import json

import pytest

from toto.errors import CheckpointError, ConfigError
from toto.jobstate import changed_settings, load_state, refuse_changed, save_state, trim_metrics


def test_changed_settings_name_nested_fields_with_both_values():
    saved = {"lr": 0.1, "model": {"dim": 8, "layers": [1, 2]}, "seed": 0, "gone": 1}
    given = {"lr": 0.1, "model": {"dim": 16, "layers": [1, 2]}, "seed": None, "new": True}
    assert changed_settings(saved, given) == ["gone (1 -> '(unset)')", "model.dim (8 -> 16)",
                                              "new ('(unset)' -> True)", "seed (0 -> None)"]
    assert changed_settings(saved, given, skip=("model.dim", "gone", "new"), ignore_none=True) == []
    refuse_changed({"a": (1, 2)}, {"a": [1, 2]}, "run")  # as JSON stores them: a tuple is a list
    with pytest.raises(ConfigError) as e:
        refuse_changed(saved, given, "--resume: OUT", skip=("gone", "new"))
    assert str(e.value) == ("--resume: OUT was started with other settings: model.dim (8 -> 16), seed (0 -> None); "
                            "resume with the original ones or start a new run (another --out)")


def test_trim_metrics_keeps_what_the_state_covers(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "model": m} for m in ("a", "b") for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 4, "mod')  # a torn last line
    trim_metrics(path, lambda r: r["model"] != "a" or r["step"] <= 2)
    assert [json.loads(s) for s in path.read_text().splitlines()] == [r for r in recs if r != {"step": 3, "model": "a"}]
    trim_metrics(tmp_path / "absent.jsonl", lambda r: True)
    assert not (tmp_path / "absent.jsonl").exists()


def test_state_round_trip_and_a_truncated_state_is_named(tmp_path):
    import torch

    state = {"epoch": 3, "w": torch.arange(4.0)}
    save_state(tmp_path / "s.pt", state)
    got = load_state(tmp_path / "s.pt")
    assert got["epoch"] == 3 and torch.equal(got["w"], state["w"])
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"s\.pt: unreadable job state"):
        load_state(tmp_path / "s.pt")


def test_a_task_resumed_with_other_settings_is_refused_naming_them(eval_world, tmp_path, capsys):
    from toto.cli import main

    argv = ["finetune", "--checkpoint", eval_world / "run", "--tokenizer", eval_world / "tok.safetensors", "--data",
            eval_world / "data", "--out", tmp_path / "o", "--no-progress", "--device", "cpu", "--epochs", "2",
            "--batch-size", "4"]
    assert main(list(map(str, [*argv, "--until", "1"]))) == 0
    lines = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    capsys.readouterr()
    assert main(list(map(str, [*argv, "--resume", "--lr", "0.5"]))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was started with other settings: finetune.lr (0.0001 -> 0.5);" in err, err
    assert (tmp_path / "o" / "metrics.jsonl").read_text().splitlines() == lines  # nothing touched
    assert main(list(map(str, [*argv, "--resume"]))) == 0
    assert [json.loads(s)["epoch"] for s in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
