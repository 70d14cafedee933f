"""`toto cater` end to end on a small generated set: every number in results.json recomputed
from the saved per-clip predictions and the scene files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toto.data.cater import cater_lists
from toto.eval.cater import localization_metrics
from toto.synth.cater import SceneConfig, generate


def _setup(tmp_path):
    """10 generated clips (every val clip also in train, so its cell is known), a patch tokenizer,
    a random tiny checkpoint -> the ``toto cater`` arguments without ``--out``, the lists folder."""
    from toto.config import build_config
    from toto.model.llama import Toto
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.data.video import read_video
    from toto.vocab import N_SPECIAL

    gen = tmp_path / "gen"
    generate(gen, 10, SceneConfig(frames=4, width=32, height=32), seed=1, val_fraction=0.4, progress=False)
    lists = gen / "lists" / "localize"  # a pipeline check: every val clip also in train, so its cell is known
    (lists / "train.txt").write_text((lists / "train.txt").read_text() + (lists / "val.txt").read_text())
    cater_lists(gen, tmp_path / "lists", frames=4, stride=1, progress=False)
    frames = np.concatenate([read_video(p, 1, 16) for p in sorted((gen / "videos").glob("*.avi"))[:4]])
    PatchTokenizer.fit(frames, n_codes=8, patch=8, resolution=16, seed=0).save(tmp_path / "tok.safetensors")
    cfg = build_config("tiny", None, ["model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
                                      f"model.vocab_size={8 + N_SPECIAL}", "model.max_seq_len=32"])
    torch.manual_seed(123)  # not the Trainer's seed: the random-init baseline must differ from it
    save_checkpoint(tmp_path / "run", 5, Toto(cfg.model), cfg, {"tokens": 0})
    args = ["cater", "--checkpoint", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok.safetensors"),
            "--data", str(tmp_path / "lists"), "--frames", "4", "--stride", "1", "--batch-size", "4", "--no-progress"]
    return args, lists, cfg


def test_cater_eval_end_to_end(tmp_path, capsys):
    from toto.cli import main
    from toto.model.llama import Toto

    args, lists, cfg = _setup(tmp_path)
    gen = tmp_path / "gen"
    out = tmp_path / "eval"
    args += ["--out", str(out), "--probe-epochs", "1", "--finetune-epochs", "1"]
    assert main(args) == 0
    assert "oracle: last place seen" in capsys.readouterr().out
    rep = json.loads((out / "results.json").read_text())
    assert set(rep["runs"]) == {"trained_frozen", "trained_finetuned", "random_init_frozen", "random_init_finetuned"}
    scenes = {p.stem + ".avi": json.loads(p.read_text()) for p in (gen / "scenes").glob("*.json")}
    val = [l.split()[0] for l in (lists / "val.txt").read_text().splitlines()]
    for run, entry in rep["runs"].items():
        pred = np.load(entry["predictions"])
        names = [Path(p).name for p in pred["paths"]]
        assert sorted(names) == sorted(val)
        cells = np.array([int(c) for c in pred["classes"]])
        guess = cells[pred["logits"].argmax(1)]
        truth = np.array([scenes[n]["label"] for n in names])
        assert np.array_equal(cells[pred["labels"]], truth)
        assert entry["metrics"]["all"]["top1"] == float((guess == truth).mean())
        l1 = np.abs(guess // 6 - truth // 6) + np.abs(guess % 6 - truth % 6)
        assert abs(entry["metrics"]["all"]["l1"] - l1.mean()) < 1e-9
        hidden = [scenes[n]["snitch_covered"][-1] for n in names]
        assert entry["metrics"]["hidden"]["n"] == sum(hidden)
    truth = [scenes[n]["label"] for n in val]
    oracle = [scenes[n]["last_seen_cell"] for n in val]
    assert rep["oracle"] == localization_metrics(oracle, truth, [scenes[n]["snitch_covered"][-1] for n in val])
    visible = [o == t for o, t, n in zip(oracle, truth, val) if not scenes[n]["snitch_covered"][-1]]
    assert all(visible)  # an uncovered snitch is where it was last seen
    # the random-init baseline is the architecture drawn as the Trainer draws step 0 (its seed), not
    # the checkpoint: after one epoch at lr 1e-4 the fine-tuned baseline is still next to that draw
    from safetensors.torch import load_file
    from toto.train.checkpoint import latest_checkpoint

    trained = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    tuned = load_file(str(latest_checkpoint(out / "finetuned" / "random_init") / "model.safetensors"))
    torch.manual_seed(cfg.train.seed)
    drawn = Toto(cfg.model).state_dict()
    assert trained.keys() == tuned.keys()
    assert max(float((tuned[k] - drawn[k]).abs().max()) for k in tuned) < 0.01
    assert max(float((tuned[k] - trained[k]).abs().max()) for k in tuned) > 0.1
    # a rerun finds every run finished (per-epoch state) and reports the same numbers
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == rep["runs"]


def test_cater_beyond_pretraining_context_through_rope_extension(tmp_path, capsys):
    """The paper's 32-frame CATER setting in miniature: clips twice as long as the pre-training
    sequences are refused by the short-context model (one line naming the lengths); after
    `toto train --init-from` on the long shards (context grown, RoPE base 50,000, weights kept)
    `toto cater` evaluates them, and its random-init baseline has the same extended context."""
    from toto.cli import main
    from toto.data.video import read_video
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import latest_checkpoint

    gen = tmp_path / "gen"
    generate(gen, 8, SceneConfig(frames=8, width=32, height=32), seed=2, val_fraction=0.5, progress=False)
    frames = np.concatenate([read_video(p, 1, 16) for p in sorted((gen / "videos").glob("*.avi"))[:3]])
    tok = tmp_path / "tok.safetensors"
    PatchTokenizer.fit(frames, n_codes=8, patch=8, resolution=16, seed=0).save(tok)  # 4 tokens a frame
    small = ["model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64", "train.micro_batch_size=2",
             "train.batch_tokens=68", "train.warmup_steps=1", "data.val_fraction=0", "train.tensorboard=false"]
    for n in (4, 8):
        assert main(["tokenize", str(gen / "videos"), "--tokenizer", str(tok), "--out", str(tmp_path / f"s{n}"),
                     "--frames", str(n), "--stride", "1", "--no-progress"]) == 0
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "s4"), "--out", str(tmp_path / "short"),
                 "--steps", "2", "--no-progress", *small]) == 0
    lists = gen / "lists" / "localize"  # as above: every val clip also in train, so its cell is a known class
    (lists / "train.txt").write_text((lists / "train.txt").read_text() + (lists / "val.txt").read_text())
    cater_lists(gen, tmp_path / "lists", frames=8, stride=1, progress=False)
    args = ["cater", "--tokenizer", str(tok), "--data", str(tmp_path / "lists"), "--frames", "8", "--stride", "1",
            "--probe-epochs", "1", "--finetune-epochs", "0", "--batch-size", "2", "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--checkpoint", str(tmp_path / "short"), "--out", str(tmp_path / "e0")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 33 positions" in err and "max_seq_len=18" in err, err
    assert "--init-from" in err  # 8 x 4 + 1 input positions vs a context of 4 x 4 + 2

    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "s8"), "--out", str(tmp_path / "long"),
                 "--steps", "1", "--no-progress", "--init-from", str(tmp_path / "short"), *small]) == 0
    saved = json.loads((latest_checkpoint(tmp_path / "long") / "config.json").read_text())["model"]
    assert saved["max_seq_len"] == 34 and saved["rope_base"] == 50000.0
    out = tmp_path / "e1"
    assert main([*args, "--checkpoint", str(tmp_path / "long"), "--out", str(out)]) == 0
    rep = json.loads((out / "results.json").read_text())
    assert set(rep["runs"]) == {"trained_frozen", "random_init_frozen"}
    n_val = len((lists / "val.txt").read_text().split())  // 2
    assert all(e["metrics"]["all"]["n"] == n_val > 0 for e in rep["runs"].values())


@pytest.mark.slow
def test_cater_under_torchrun_matches_one_process(tmp_path):
    """``toto cater`` on 2 gloo ranks (DDP; one val clip, so rank 1 holds no val row at all) gives
    the one-process numbers: every run's metrics, and its val logits up to float rounding."""
    args, _, _ = _setup(tmp_path)
    args += ["--probe-epochs", "2", "--finetune-epochs", "2", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, pre in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                            "--master_port", str(_free_port())])):
        r = subprocess.run([sys.executable, *pre, "-m", "toto", *args, "--out", str(tmp_path / out)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / n / "results.json").read_text())["runs"] for n in ("one", "two"))
    assert sorted(one) == sorted(two) and len(one) == 4
    for run, entry in one.items():
        assert two[run]["metrics"] == entry["metrics"]
        a, b = np.load(entry["predictions"]), np.load(two[run]["predictions"])
        assert a["paths"].tolist() == b["paths"].tolist()
        np.testing.assert_allclose(b["logits"], a["logits"], rtol=1e-3, atol=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
