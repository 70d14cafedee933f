"""The downstream-task framework (toto.tasks.base): under torchrun, 2 CPU ranks (gloo) train what
one process trains, on a validation split that does not divide evenly between the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from toto.ioutil import read_jsonl
from conftest import tiny_checkpoint


def _setup(tmp_path: Path):
    """2 classes differing in brightness: 10 train images, 3 val images (2 + 1), a patch
    tokenizer and a random tiny checkpoint."""
    from toto.tokenizers.patch import PatchTokenizer

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, counts in (("train", (5, 5)), ("val", (2, 1))):
        for c, (base, n) in enumerate(zip((60, 180), counts)):
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                p = root / split / f"c{c}" / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(p)
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted(root.glob("train/c*/*.png"))])
    PatchTokenizer.fit(frames, n_codes=8, patch=8, resolution=16, seed=0).save(tmp_path / "tok.safetensors")
    tiny_checkpoint(tmp_path / "run", 8, 64, step=7)
    return root, tmp_path / "tok.safetensors", tmp_path / "run"


# Probe parameters without a true gradient: the key bias shifts every attention score equally
# (softmax ignores it), the value bias shifts the pooled vector by a constant that BatchNorm
# removes (and with it the running mean). Their gradients are float rounding noise, which AdamW
# scales up to full-size steps, so they wander differently with any change in summation order;
# the function they compute does not depend on them (the logits are compared below).
GAUGE = {"pool.k.bias", "pool.v.bias", "norm.running_mean"}


def _free_port() -> int:
    """A port nobody listens on now (other test runs on this machine launch torchrun too)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toto(args: list[str], nproc: int | None = None):
    """``nproc=None``: one plain process; a number: under torchrun with that many gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "toto", *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_port", str(_free_port()), "-m", "toto", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_uneven_val_split(tmp_path):
    """``toto finetune`` (trunk + attentive probe, CE + next-token loss) and ``toto probe --online``
    (frozen trunk, probes of two layers x two poolings): 2 DDP ranks vs 1 process on the same
    global batches. 10 train samples in batches of 3 (a trailing batch of one is dropped): every
    step gives rank 0 two rows and rank 1 one, so the loss must be weighted by rows and BatchNorm
    must use global statistics; 3 val samples (rank 0 holds 2, rank 1 holds 1 and runs a padding
    forward). Every logged number and every final weight agree up to float
    rounding, and the val predictions come back in list order."""
    data, tok, run = _setup(tmp_path)
    common = ["--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(data), "--no-progress"]
    ft = ["finetune", *common, "--epochs", "2", "--batch-size", "3", "--lr", "1e-3", "--warmup-epochs", "0.5"]
    on = ["probe", *common, "--online", "--layers", "1,2", "--epochs", "2", "--probe-batch-size", "3",
          "--lr", "3e-3"]
    for args, name in ((ft, "ft"), (on, "online")):
        _toto([*args, "--out", str(tmp_path / f"{name}1")])
        _toto([*args, "--out", str(tmp_path / f"{name}2")], nproc=2)

    # fine-tuning: the per-epoch records, the trunk, the probe, the val predictions
    one, two = (read_jsonl(tmp_path / f"ft{n}" / "metrics.jsonl") for n in (1, 2))
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2]
    assert [r["step"] for r in two] == [3, 6]
    for a, b in zip(one, two):
        for k in ("train_loss", "train_ce", "train_ntp", "train_top1", "val_top1", "val_ce", "val_ntp", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a, b)
    rep = json.loads((tmp_path / "ft2" / "results.json").read_text())
    assert rep["n_val"] == 3 and rep["n_train"] == 10
    ckpts = [Path(json.loads((tmp_path / f"ft{n}" / "results.json").read_text())["finetuned_checkpoint"])
             for n in (1, 2)]
    for f in ("model.safetensors", "probe.safetensors"):
        wa, wb = (load_file(str(c / f)) for c in ckpts)
        assert wa.keys() == wb.keys()
        for k in set(wa) - GAUGE:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4, msg=k)
    pa, pb = (np.load(tmp_path / f"ft{n}" / "val_predictions.npz") for n in (1, 2))
    assert pb["paths"].tolist() == pa["paths"].tolist() and pb["labels"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(pb["logits"], pa["logits"], rtol=1e-3, atol=1e-4)  # GAUGE drift reaches eval

    # online probing: every probe's results and the saved probes
    ra, rb = (json.loads((tmp_path / f"online{n}" / "results.json").read_text())["models"]["trained"]
              for n in (1, 2))
    for layer in ("1", "2"):
        for pooling in ("attentive", "average"):
            a, b = ra["layers"][layer][pooling], rb["layers"][layer][pooling]
            assert (b["top1"], b["train_top1"]) == (a["top1"], a["train_top1"])
            assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
    sa, sb = (tmp_path / f"online{n}" / "online_state" / "trained" / "epoch_0002" for n in (1, 2))
    for f in sorted(p.name for p in sa.glob("layer*.safetensors")):
        wa, wb = load_file(str(sa / f)), load_file(str(sb / f))
        for k in set(wa) - GAUGE:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-4, msg=f"{f} {k}")


def test_a_task_is_a_reader_heads_and_a_metric(tmp_path):
    """The worked example of docs/framework.md: ``TaskRun(...).run(ClassifyTask(...))`` trains
    the task's heads on the frozen trained model and on the random-init baseline, one generic
    metrics.jsonl record per model and epoch, the probes saved per epoch; the logged val top-1
    and logits equal what the saved probe gives on features computed independently
    (``hidden_states``)."""
    from toto.data.images import read_image
    from toto.data.lists import scan_dataset
    from toto.tasks.base import Loop, TaskRun
    from toto.tasks.classify import ClassifyTask
    from toto.tasks.heads import Probe
    from toto.tokenizers.base import get_tokenizer
    from toto.train.checkpoint import load_model
    from toto.vocab import VocabLayout

    data, tok, run = _setup(tmp_path)
    task = ClassifyTask(data, {"probe": (1, "attentive")})
    done = TaskRun(str(run), str(tok), tmp_path / "out", Loop(epochs=2, batch_size=4), head_lr=3e-3,
                   random_init=True, progress=False).run(task)
    assert sorted(done) == ["random_init", "trained"]
    recs = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [(r["model"], r["epoch"]) for r in recs] == [("trained", 1), ("trained", 2), ("random_init", 1),
                                                          ("random_init", 2)]
    assert recs[-1]["step"] == 2 * 3 and recs[0]["train_ntp"] is None  # 10 samples: batches of 4, 4, 2

    t = get_tokenizer(tok)
    layout = VocabLayout(n_codes=t.n_codes)
    val = scan_dataset(data).splits["val"]
    codes = t.encode(np.stack([read_image(s.path, t.resolution) for s in val]))
    seqs = torch.from_numpy(np.stack([layout.sequence(c[None], "image") for c in codes]).astype(np.int64))
    labels = torch.tensor([s.label for s in val])
    model, *_ = load_model(run)
    probe = Probe(32, 2, "attentive", 2).eval()
    probe.load_state_dict(load_file(str(tmp_path / "out" / "trained" / "epoch_0002" / "probe.safetensors")))
    with torch.no_grad():
        feats = model.hidden_states(seqs[:, :-1], [1])[1][:, 1:].half()
        logits = probe(feats.float())
    top1 = float((logits.argmax(1) == labels).float().mean())
    torch.testing.assert_close(done["trained"].stats.val_logits["probe"], logits, rtol=1e-5, atol=1e-6)
    trained = [r for r in recs if r["model"] == "trained"]
    assert trained[-1]["val"]["probe"]["top1"] == pytest.approx(top1)
    assert done["trained"].stats.val["probe"]["top1"] == pytest.approx(top1)


def test_precomputed_features_train_as_the_live_frozen_trunk(tmp_path):
    """``TaskRun(precompute=n)``: a frozen run's features computed once per model (the trunk
    dropped afterwards) train the heads to the logits of one trunk pass per epoch."""
    from toto.tasks.base import Loop, TaskRun
    from toto.tasks.classify import ClassifyTask

    data, tok, run = _setup(tmp_path)
    done = {}
    for name, n in (("live", 0), ("once", 3)):
        done[name] = TaskRun(str(run), str(tok), tmp_path / name, Loop(epochs=2, batch_size=4), head_lr=3e-3,
                             random_init=True, progress=False, precompute=n).run(
            ClassifyTask(data, {"probe": (1, "attentive")}))
    for model in ("trained", "random_init"):
        assert done["live"][model].model.trunk is not None and done["once"][model].model.trunk is None
        torch.testing.assert_close(done["once"][model].stats.val_logits["probe"],
                                   done["live"][model].stats.val_logits["probe"], rtol=1e-5, atol=1e-6)
