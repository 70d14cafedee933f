"""The STA model end to end on a tiny generated release: train (frozen, fine-tuned, random init),
predict challenge-format results that the official checks accept, the detections-only baseline,
proposal targets, pyramid shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from toto.cli import main
from toto.data.sta import Detection, StaObject, StaRecord
from toto.synth.sta import make_sta_release
from toto.eval.anticipation import Pyramid, StaConfig, prepare, pyramid_layers
from toto.data.sta import StaExample
from conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from toto.tokenizers.patch import PatchTokenizer

    root = tmp_path_factory.mktemp("ant")
    rel = make_sta_release(root / "rel", n_train=8, n_val=4, n_test=2, width=64, height=64, context=8,
                           max_ttc_frames=6, seed=3)
    import av

    with av.open(str(rel / "clips" / "clip00000.mp4")) as c:
        frames = np.stack([f.reformat(width=32, height=32, format="rgb24").to_ndarray() for f in c.decode(video=0)])
    tok = PatchTokenizer.fit(frames, n_codes=16, patch=8, resolution=32, seed=0)
    tok.save(root / "tok.safetensors")
    tiny_checkpoint(root / "run", 16, 80, step=5, n_layers=4)
    return rel, root / "tok.safetensors", root / "run", root


def _train(setup, out, *extra):
    rel, tok, run, _ = setup
    args = ["anticipate", "train", "--checkpoint", str(run), "--tokenizer", str(tok), "--annotations",
            str(rel / "annotations"), "--clips", str(rel / "clips"), "--detections", str(rel / "object_detections.json"),
            "--out", str(out), "--frames", "4", "--stride", "2", "--epochs", "3", "--batch-size", "4",
            "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_frozen_train_predict_eval(setup, capsys):
    rel, _, run, root = setup
    out = root / "frozen"
    rep = _train(setup, out)
    assert rep["layers"] == [0, 1, 2, 3, 4] and rep["train_examples"] == 8 and rep["val_examples"] == 4
    assert rep["history"][-1]["ttc_l1"] < rep["history"][0]["ttc_l1"] / 2  # it learns
    assert set(rep["val"]) == {"map_box_noun", "map_box_noun_verb", "map_box_noun_ttc", "map_box_noun_verb_ttc"}
    # frozen: no trunk weights saved; the official checks accept the results and score them the same
    assert not any(k.startswith("trunk.") for k in load_file(str(out / "sta.safetensors")))
    res = out / "pred_val.json"
    assert main(["anticipate", "predict", "--run", str(out), "--annotations-file",
                 str(rel / "annotations" / "fho_sta_val.json"), "--clips", str(rel / "clips"), "--detections",
                 str(rel / "object_detections.json"), "--out", str(res), "--no-progress"]) == 0
    assert json.loads(res.read_text()) == json.loads((out / "val_results.json").read_text())
    assert main(["anticipate", "eval", str(res), str(rel / "annotations" / "fho_sta_val.json"),
                 "--json", str(out / "scores.json")]) == 0
    assert json.loads((out / "scores.json").read_text()) == pytest.approx(rep["val"])
    # every detection becomes one prediction: score = detection score x verb probability <= det score
    dets = json.loads((rel / "object_detections.json").read_text())
    for uid, preds in json.loads(res.read_text())["results"].items():
        assert np.allclose([p["box"] for p in preds], [d["box"] for d in dets[uid]])
        assert all(p["score"] <= d["score"] + 1e-9 and p["time_to_contact"] > 0 for p, d in zip(preds, dets[uid]))
    # unannotated test file: every uid answered
    test = out / "pred_test.json"
    assert main(["anticipate", "predict", "--run", str(out), "--annotations-file",
                 str(rel / "annotations" / "fho_sta_test_unannotated.json"), "--clips", str(rel / "clips"),
                 "--detections", str(rel / "object_detections.json"), "--out", str(test), "--no-progress"]) == 0
    assert sorted(json.loads(test.read_text())["results"]) == ["sta00012", "sta00013"]
    # detections only: the train split's most frequent verb and mean TTC everywhere
    base = out / "pred_base.json"
    assert main(["anticipate", "predict", "--run", str(out), "--annotations-file",
                 str(rel / "annotations" / "fho_sta_val.json"), "--clips", str(rel / "clips"), "--detections",
                 str(rel / "object_detections.json"), "--out", str(base), "--detections-only", "--no-progress"]) == 0
    train = json.loads((rel / "annotations" / "fho_sta_train.json").read_text())["annotations"]
    verbs = [o["verb_category_id"] for a in train for o in a["objects"]]
    preds = [p for v in json.loads(base.read_text())["results"].values() for p in v]
    assert {p["verb_category_id"] for p in preds} == {int(np.bincount(verbs).argmax())}
    assert {round(p["time_to_contact"], 9) for p in preds} == \
        {round(float(np.mean([o["time_to_contact"] for a in train for o in a["objects"]])), 9)}


def test_finetune_and_random_init(setup):
    _, _, run, root = setup
    rep = _train(setup, root / "ft", "--mode", "finetune", "--epochs", "2")
    trunk = load_file(str(root / "ft" / "sta.safetensors"))
    orig = load_file(str(run / "checkpoints" / "step_00000005" / "model.safetensors"))
    key = "layers.0.attn.wqkv.weight"
    assert not torch.equal(trunk[f"trunk.{key}"], orig[key])  # the trunk moved
    assert rep["config"]["mode"] == "finetune"
    rnd = _train(setup, root / "rnd", "--random-init", "--epochs", "1")
    assert rnd["random_init"] is True


def test_targets_follow_the_baseline_matching():
    gt = StaObject((10.0, 10.0, 30.0, 30.0), 2, 1, 0.5)
    rec = StaRecord("u", "v", 0, "c", 0, 64, 64, 30.0, [gt])
    dets = [Detection((11.0, 10.0, 30.0, 31.0), 0.9, 2), Detection((40.0, 40.0, 60.0, 60.0), 0.5, 0)]
    ex = StaExample(rec, np.zeros((2, 16, 16, 3), np.uint8), (64, 64), dets)

    class Tok:
        def encode(self, frames):
            return np.zeros((len(frames), 2, 2), np.int64)

    from toto.vocab import VocabLayout

    p = prepare([ex], Tok(), VocabLayout(n_codes=4), {0: 0, 1: 1, 2: 2}, {0: 0, 1: 1}, True, 0.5)
    assert p.verb_targets[0].tolist() == [1, -100, 1]  # matched det, unmatched det, added GT
    assert np.isnan(p.ttc_targets[0][1]) and p.ttc_targets[0][0] == 0.5
    assert p.rois[0][0].tolist() == pytest.approx([11 / 64, 10 / 64, 30 / 64, 31 / 64])
    assert p.tokens.shape == (1, 2 + 2 * 4)


def test_pyramid_layers_and_scales():
    assert pyramid_layers(4) == [0, 1, 2, 3, 4] and pyramid_layers(12) == [0, 3, 6, 9, 12]
    assert pyramid_layers(16) == [0, 4, 8, 12, 16]
    pyr = Pyramid(6, 5)
    maps = pyr([torch.randn(2, 6, 8, 8) for _ in range(5)])
    assert [tuple(m.shape) for m in maps] == [(2, 5, 16, 16), (2, 5, 8, 8), (2, 5, 8, 8), (2, 5, 4, 4), (2, 5, 2, 2)]
    assert StaConfig(mode="x").mode == "x"
    with pytest.raises(Exception, match="--mode"):
        StaConfig(mode="x").validate()


def test_killed_run_resumes_exactly(setup, monkeypatch):
    from toto.eval import anticipation

    rel, tok, run, root = setup
    args = (run, tok, rel / "annotations", rel / "clips", rel / "object_detections.json")
    cfg = dict(frames=4, stride=2, epochs=2, batch_size=4)
    whole = anticipation.train_job(*args, root / "whole", StaConfig(**cfg), False, "cpu", False)
    real, calls = anticipation.save_state, []

    def dies_after_first_epoch(path, state):
        real(path, state)
        calls.append(path)
        raise KeyboardInterrupt  # the kill, right after epoch 1's state is on disk

    monkeypatch.setattr(anticipation, "save_state", dies_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        anticipation.train_job(*args, root / "killed", StaConfig(**cfg), False, "cpu", False)
    monkeypatch.setattr(anticipation, "save_state", real)
    resumed = anticipation.train_job(*args, root / "killed", StaConfig(**cfg), False, "cpu", False)
    assert len(calls) == 1 and resumed["history"] == whole["history"]
    a, b = load_file(str(root / "whole" / "sta.safetensors")), load_file(str(root / "killed" / "sta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="other settings"):
        anticipation.train_job(*args, root / "killed", StaConfig(**{**cfg, "epochs": 3}), False, "cpu", False)
