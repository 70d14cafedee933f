"""`toto probe --online`: the same probes as the cached path from one frozen forward per batch,
exact resumption, and the cached path's errors."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_checkpoint, unreadable_val_dataset
from test_probe import _tiny_setup  # 2-class images (one broken file), a patch tokenizer, a random tiny checkpoint

from toto.cli import main
from toto.eval.probe import ProbeConfig, ProbeJob
from toto.tasks.base import epoch_steps


def _args(run, tok, data, out, *extra):
    return ["probe", "--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
            "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits at 16 px (20 per class and split: 200 train, 200 val), a 4x4 patch
    tokenizer and a random 2-layer checkpoint."""
    from toto.data.images import read_image
    from toto.data.samples import write_digit_folders
    from toto.data.lists import scan_dataset
    from toto.tokenizers.patch import PatchTokenizer

    root = tmp_path_factory.mktemp("digits")
    data = write_digit_folders(root / "data", size=16)
    frames = np.stack([read_image(s.path, 16) for s in scan_dataset(data, 20).splits["train"]])
    PatchTokenizer.fit(frames, n_codes=16, patch=4, resolution=16, seed=0).save(root / "tok.safetensors")
    tiny_checkpoint(root / "run", 16, 32)
    return data, root / "tok.safetensors", root / "run"


def _keys(d):
    """The nested key structure of a report (values left out)."""
    return {k: _keys(v) for k, v in d.items()} if isinstance(d, dict) else None


def test_online_matches_cached(digits, tmp_path):
    """Same checkpoint, seed and probe settings: the online probes end where the cached ones do.

    Tolerance: every probe starts from the same seeded draw and sees the same batches; its input
    differs only where a feature computed in a batch of 40 (online) and in a batch of 32
    (extraction) rounds to a neighbouring float16 (checked first). Such a one-ulp difference
    moves the probes by ~1e-6 relative, which can flip a val sample whose two top logits are that
    close: accuracies may differ by a sample or two, losses by ~1e-4 relative."""
    from toto.tasks.base import TaskModel
    from toto.train.checkpoint import load_model

    data, tok, run = digits
    cfg = ProbeConfig(epochs=4, batch_size=40, lr=3e-3, warmup_epochs=1)
    common = dict(checkpoint=str(run), tokenizer=str(tok), data=str(data), max_per_class=20, probe=cfg,
                  progress=False)
    cached = ProbeJob(out=tmp_path / "cached", **common).run()
    online = ProbeJob(out=tmp_path / "online", online=True, **common).run()

    # the features, on the first val batch: online (one forward over cached tokens) vs the feature cache
    (tok_cache,) = [p for p in (tmp_path / "online" / "tokens").iterdir() if p.is_dir()]
    (feat_cache,) = [p for p in (tmp_path / "cached" / "features").iterdir() if p.is_dir()]
    tokens = load_file(str(tok_cache / "val_00000.safetensors"))["tokens"][:40].long()  # (40, L)
    feats = load_file(str(feat_cache / "val_00000.safetensors"))
    model, *_ = load_model(run)
    frozen = TaskModel({f"l{i}": (i, torch.nn.Identity()) for i in (0, 1, 2)}, model, pad=0)
    got, _ = frozen.features(tokens)  # [start] + codes + [end]: the end token is not fed
    for layer in (0, 1, 2):
        want = feats[f"layer{layer}"][:40]  # (40, 16, 32) float16
        assert got[layer].shape == want.shape and got[layer].dtype == torch.float16
        torch.testing.assert_close(got[layer], want, rtol=2 ** -10, atol=1e-5)  # one float16 step at most
        assert (got[layer] == want).float().mean() > 0.99

    assert online["mode"] == "online" and "mode" not in cached
    assert _keys({k: v for k, v in online.items() if k not in ("mode", "token_cache")}) == _keys(cached)
    c, o = cached["models"]["trained"], online["models"]["trained"]
    assert (o["n_train"], o["n_val"], o["skipped"]) == (c["n_train"], c["n_val"], c["skipped"]) == \
        (200, 200, {"train": [], "val": []})
    assert o["features"] is None
    for layer in ("0", "1", "2"):
        for pooling in ("attentive", "average"):
            a, b = c["layers"][layer][pooling], o["layers"][layer][pooling]
            assert abs(a["top1"] - b["top1"]) <= 2 / 200 + 1e-9, (layer, pooling, a, b)
            assert abs(a["top5"] - b["top5"]) <= 2 / 200 + 1e-9, (layer, pooling, a, b)
            assert abs(a["train_top1"] - b["train_top1"]) <= 2 / 200 + 1e-9, (layer, pooling, a, b)
            assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-3)
    assert max(c["layers"][l]["attentive"]["top1"] for l in "012") > 0.3  # it learned something (chance 0.1)
    assert (tmp_path / "online" / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best layer" in ProbeJob.table(online)


def test_all_layers_and_models_from_one_forward_per_batch(tmp_path):
    """With 2 layers x 2 poolings x 2 models, each model still runs once per batch (train and val
    batches every epoch, then one pass over train for train top-1), only up to the deepest
    requested layer, in batches of the probe batch size."""
    from toto.model.llama import Block, Toto

    data, tok, run = _tiny_setup(tmp_path)
    calls, blocks = [], []
    orig_blocks, orig_forward = Toto.layer_stream, Block.forward

    def counting_blocks(self, tokens, upto, pos=None):
        calls.append((len(tokens), upto))
        yield from orig_blocks(self, tokens, upto, pos)

    def counting_forward(self, *a, **k):
        blocks.append(1)
        return orig_forward(self, *a, **k)

    epochs, bs = 3, 6
    with mock.patch.object(Toto, "layer_stream", counting_blocks), mock.patch.object(Block, "forward", counting_forward):
        assert main(_args(run, tok, data, tmp_path / "o", "--online", "--layers", "0,1", "--random-init",
                          "--epochs", epochs, "--probe-batch-size", bs)) == 0
    n_train, n_val = 16, 8  # 17 train files, one broken
    train_batches, val_batches = epoch_steps(n_train, bs), -(-n_val // bs)
    per_model = epochs * (train_batches + val_batches) + -(-n_train // bs)
    assert len(calls) == 2 * per_model  # trained + random init; not x layers, not x poolings
    assert {upto for _, upto in calls} == {1}  # block 2 is never run
    assert len(blocks) == len(calls)  # one block call per forward: the only block below layer 1
    assert [b for b, _ in calls[:train_batches]] == [6, 6, 4]  # 16 = 6 + 6 + 4
    rep = json.loads((tmp_path / "o" / "results.json").read_text())
    assert sorted(rep["models"]) == ["random_init", "trained"]
    assert all(sorted(m["layers"]) == ["0", "1"] for m in rep["models"].values())
    recs = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["model"], r["epoch"]) for r in recs] == [(m, e) for m in ("trained", "random_init") for e in (1, 2, 3)]
    assert recs[-1]["step"] == epochs * train_batches
    assert len(recs[0]["val_top1"]) == 2 * 2  # layers x poolings, per model


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, capsys):
    from toto.tasks.base import TaskModel

    data, tok, run = _tiny_setup(tmp_path)
    common = ("--online", "--layers", "1,2", "--epochs", "3", "--probe-batch-size", "8", "--lr", "3e-3")
    assert main(_args(run, tok, data, tmp_path / "full", *common)) == 0

    # killed in the second train batch of epoch 2 (forwards: 2 train + 1 val per epoch)
    calls, features = [], TaskModel.features

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return features(*a, **k)

    job = ProbeJob(str(run), str(tok), str(data), tmp_path / "split", layers=[1, 2], online=True, progress=False,
                   probe=ProbeConfig(epochs=3, batch_size=8, lr=3e-3))
    with mock.patch.object(TaskModel, "features", dying), pytest.raises(KeyboardInterrupt):
        job.run()
    state = tmp_path / "split" / "online_state" / "trained"
    assert (state / "latest").read_text() == "epoch_0001" and sorted(p.name for p in state.iterdir()) == \
        ["epoch_0001", "latest"]
    assert not (tmp_path / "split" / "results.json").exists()
    chunks = sorted((tmp_path / "split" / "tokens").glob("*/*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in chunks]
    capsys.readouterr()

    assert main(_args(run, tok, data, tmp_path / "split", *common)) == 2  # an existing run needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(_args(run, tok, data, tmp_path / "split", *common[:-1], "1e-2", "--resume")) == 2
    assert "probe.lr" in capsys.readouterr().err
    assert main(_args(run, tok, data, tmp_path / "split", *common, "--resume")) == 0
    assert "resuming" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in chunks] == stamps  # tokens were not encoded again

    full = json.loads((tmp_path / "full" / "results.json").read_text())
    split = json.loads((tmp_path / "split" / "results.json").read_text())
    assert split["models"]["trained"]["layers"] == full["models"]["trained"]["layers"]
    assert split["models"]["trained"]["best"] == full["models"]["trained"]["best"]
    recs = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "split")]
    assert [r["epoch"] for r in recs[1]] == [1, 2, 3]
    for a, b in zip(*recs):
        assert (a["train_loss"], a["val_top1"], a["lr"]) == (b["train_loss"], b["val_top1"], b["lr"])
    # a finished run resumed again only redoes the closing train pass: the same results
    assert main(_args(run, tok, data, tmp_path / "split", *common, "--resume")) == 0
    assert json.loads((tmp_path / "split" / "results.json").read_text())["models"] == split["models"]


def test_errors_are_the_cached_paths(tmp_path, capsys):
    from toto.tokenizers.patch import PatchTokenizer

    data, tok, run = _tiny_setup(tmp_path)
    other = tmp_path / "other.safetensors"
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    PatchTokenizer.fit(frames, n_codes=5, patch=8, resolution=16).save(other)
    broken_val = unreadable_val_dataset(tmp_path / "bv")

    def error(args):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("toto probe: error:") and "\n" not in err, err
        return err

    cases = [(tok, data, ["--layers", "0,5"]), (other, data, []), (tok, data, ["--pooling", "max"]),
             (tok, data, ["--layers", "a"]), (tok, broken_val, []), (tok, tmp_path / "nope", [])]
    for i, (t, d, extra) in enumerate(cases):
        cached = error(_args(run, t, d, tmp_path / f"c{i}", *extra))
        assert error(_args(run, t, d, tmp_path / f"o{i}", "--online", *extra)) == cached
    assert "--resume continues an --online run" in error(_args(run, tok, data, tmp_path / "r", "--resume"))
    assert "no readable media in the val split" in error(_args(run, tok, broken_val, tmp_path / "o9", "--online"))
