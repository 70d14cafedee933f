"""Fine-tuning with an attentive probe (`toto finetune`): the loss decomposition against an
independent computation, what moves and what stays frozen, exact resumption, the token cache,
bad input, and a run on scikit-learn's digits that learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_checkpoint, unreadable_val_dataset
from test_probe import _tiny_setup  # 2-class images, a patch tokenizer, a random tiny checkpoint

from toto.cli import main
from toto.errors import ConfigError
from toto.eval.finetune import FinetuneConfig
from toto.tasks.heads import Probe


def _args(run, tok, data, out, *extra):
    return ["finetune", "--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
            "--no-progress", "--batch-size", "4", *map(str, extra)]


def _weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / "model.safetensors"))


def _latest(out: Path) -> Path:
    from toto.train.checkpoint import latest_checkpoint

    return latest_checkpoint(out)


def _val_sequences(data: Path, tok_path: Path):
    """The val split encoded independently of the fine-tuning code: (tokens (N, L), labels (N,))."""
    from toto.data.images import read_image
    from toto.data.lists import scan_dataset
    from toto.tokenizers.base import get_tokenizer
    from toto.vocab import VocabLayout

    tok = get_tokenizer(tok_path)
    layout = VocabLayout(n_codes=tok.n_codes)
    val = scan_dataset(data).splits["val"]
    codes = tok.encode(np.stack([read_image(s.path, tok.resolution) for s in val]))  # (N, h, w)
    seqs = np.stack([layout.sequence(c[None], "image") for c in codes]).astype(np.int64)
    return torch.from_numpy(seqs), torch.tensor([s.label for s in val])


# -- the loss --------------------------------------------------------------------------------

def test_task_model_matches_model_forward_and_hidden_states():
    """The fine-tuned TaskModel's probe logits on ``hidden_states`` (code positions) and its NTP
    from ``Toto.forward``, computed separately, are what one pass returns; without the NTP term
    the blocks above the probed layer are never run and are frozen (no unused DDP parameters)."""
    from toto.config import build_config
    from toto.model.llama import Toto
    from toto.tasks.base import TaskModel

    cfg = build_config("tiny", None, ["model.n_layers=3", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
                                      "model.vocab_size=20", "model.max_seq_len=16", "model.tie_embeddings=false"])
    torch.manual_seed(0)
    model = Toto(cfg.model).eval()
    probe = Probe(32, 5, "attentive", heads=2).eval()
    batch = torch.cat([torch.full((6, 1), 3), torch.randint(4, 20, (6, 9)), torch.full((6, 1), 2)], 1)  # (6, 11)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    layer = 1
    want = probe(model.hidden_states(inputs, [layer])[layer][:, 1:])
    _, want_ntp = model(inputs, targets)

    tm = TaskModel({"probe": (layer, probe)}, model, train_trunk=True, ntp_weight=0.7, pad=0)
    logits, ntp = tm(batch, with_ntp=True)
    torch.testing.assert_close(logits["probe"], want)
    torch.testing.assert_close(ntp, want_ntp)
    assert all(p.requires_grad for p in model.parameters())

    calls = []
    hook = model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    tm0 = TaskModel({"probe": (layer, probe)}, model, train_trunk=True, ntp_weight=0.0, pad=0)
    logits0, ntp0 = tm0(batch)
    hook.remove()
    assert ntp0 is None and calls == []
    torch.testing.assert_close(logits0["probe"], want)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("layers.1.", "layers.2.", "norm.", "head."))}


def test_config_rejects_bad_numbers():
    for bad in ({"epochs": 0}, {"ntp_weight": -1.0}, {"probe_lr": 0.0}, {"lr": -1e-4}, {"batch_size": 0},
                {"lr": float("nan")}, {"dtype": "fp8"}):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad).validate()


# -- the command on a tiny checkpoint ----------------------------------------------------------

def test_finetune_end_to_end_metrics_match_an_independent_evaluation(tmp_path, capsys):
    data, tok, run = _tiny_setup(tmp_path)
    out = tmp_path / "out"
    assert main(_args(run, tok, data, out, "--epochs", "2", "--lr", "1e-3")) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable" in printed and "after epoch 1" in printed

    rep = json.loads((out / "results.json").read_text())
    assert rep["layer"] == 1 and rep["n_layers"] == 2  # default: the middle layer
    assert rep["n_train"] == 16 and rep["n_val"] == 8 and rep["n_classes"] == 2
    assert [Path(p).name for p in rep["skipped"]["train"]] == ["broken.jpg"]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2] and rep["epochs"] == recs
    assert rep["final"]["val_top1"] == recs[-1]["val_top1"] and rep["first_epoch"]["val_top1"] == recs[0]["val_top1"]
    assert recs[-1]["step"] == 8  # 16 samples in batches of 4, 2 epochs
    assert (out / "finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved trunk is a normal checkpoint; with the saved probe it reproduces the logged val metrics
    from toto.train.checkpoint import load_model

    ckpt = _latest(out)
    assert Path(rep["finetuned_checkpoint"]) == ckpt
    model, cfg, state = load_model(out)
    assert state["epoch"] == 2 and state["step"] == 8
    probe = Probe(cfg.model.dim, 2, "attentive", heads=cfg.model.n_heads)
    probe.load_state_dict(load_file(str(ckpt / "probe.safetensors")))
    probe.eval()
    tokens, labels = _val_sequences(data, tok)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = probe(model.hidden_states(inputs, [1])[1][:, 1:])
        _, ntp = model(inputs, targets)
    assert recs[-1]["val_ce"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert recs[-1]["val_ntp"] == pytest.approx(float(ntp), rel=1e-5)
    assert recs[-1]["val_top1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    pred = np.load(out / "val_predictions.npz")  # per-sample logits of the last evaluation, in list order
    assert [Path(p).name for p in pred["paths"]] == [Path(p).name for p in sorted(data.glob("val/c*/*.png"))]
    np.testing.assert_allclose(pred["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    assert pred["labels"].tolist() == labels.tolist() and pred["classes"].tolist() == ["c0", "c1"]
    # and the trunk did move away from the pre-trained weights
    src, now = _weights(_latest(run)), _weights(ckpt)
    assert all(not torch.equal(src[k], now[k]) for k in src)

    # the token cache holds the same sequences as the independent encoding
    from safetensors.numpy import load_file as load_np

    (cache,) = [p for p in (out / "tokens").iterdir() if p.is_dir()]
    cached = load_np(str(cache / "val_00000.safetensors"))
    assert cached["tokens"].dtype == np.uint16
    np.testing.assert_array_equal(cached["tokens"].astype(np.int64), tokens.numpy())
    np.testing.assert_array_equal(cached["labels"], labels.numpy())


def test_frozen_trunk_and_plain_finetuning_move_only_what_they_should(tmp_path):
    data, tok, run = _tiny_setup(tmp_path)
    src = _weights(_latest(run))

    # --lr 0: the trunk is frozen, only the probe learns
    assert main(_args(run, tok, data, tmp_path / "frozen", "--epochs", "1", "--lr", "0")) == 0
    ckpt = _latest(tmp_path / "frozen")
    assert all(torch.equal(src[k], v) for k, v in _weights(ckpt).items())
    probe = load_file(str(ckpt / "probe.safetensors"))
    torch.manual_seed(0)
    fresh = Probe(32, 2, "attentive", heads=2).state_dict()
    assert not torch.equal(probe["pool.k.weight"], fresh["pool.k.weight"])

    # --ntp-weight 0 at layer 1 of 2: the NTP term is absent, block 2 and the head get no gradient
    assert main(_args(run, tok, data, tmp_path / "plain", "--epochs", "1", "--lr", "1e-3", "--ntp-weight", "0",
                      "--layer", "1")) == 0
    rec = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text())
    assert rec["train_ntp"] is None and rec["train_loss"] == pytest.approx(rec["train_ce"])
    assert rec["val_ntp"] > 0  # still measured on val
    now = _weights(_latest(tmp_path / "plain"))
    above = [k for k in src if k.startswith(("layers.1.", "norm.", "head."))]
    below = [k for k in src if k.startswith(("tok_emb.", "layers.0."))]
    assert above and below
    assert all(torch.equal(src[k], now[k]) for k in above)
    assert all(not torch.equal(src[k], now[k]) for k in below)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys):
    data, tok, run = _tiny_setup(tmp_path)
    common = ("--epochs", "3", "--lr", "1e-3", "--warmup-epochs", "0.5")
    assert main(_args(run, tok, data, tmp_path / "full", *common)) == 0
    assert main(_args(run, tok, data, tmp_path / "split", *common, "--until", "1")) == 0
    recs = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1]
    # a killed epoch 2 left a record after the checkpoint: resume drops it and redoes the epoch
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**recs[0], "epoch": 2, "val_top1": -1.0}) + "\n")
    chunks = sorted((tmp_path / "split" / "tokens").glob("*/*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in chunks]
    capsys.readouterr()

    assert main(_args(run, tok, data, tmp_path / "split", *common)) == 2  # an existing run needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main(_args(run, tok, data, tmp_path / "split", *common, "--resume", "--probe-lr", "0.01")) == 2
    assert "finetune.probe_lr" in capsys.readouterr().err
    assert main(_args(run, tok, data, tmp_path / "split", *common, "--resume")) == 0
    assert [p.stat().st_mtime_ns for p in chunks] == stamps  # tokens were not encoded again

    full = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in split] == [1, 2, 3]
    for a, b in zip(full, split):
        for k in ("train_loss", "train_ce", "train_ntp", "train_top1", "val_top1", "val_ce", "val_ntp", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a, b)
    wa, wb = _weights(_latest(tmp_path / "full")), _weights(_latest(tmp_path / "split"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_token_cache_resumes_after_a_kill_mid_encoding(tmp_path):
    """A kill during the third tokenizer call leaves two finished chunks; the rerun encodes only
    the rest, lists the unreadable file once, and gives what one uninterrupted pass gives."""
    from toto.data.lists import scan_dataset
    from toto.eval.features import SequenceSpec
    from toto.eval.features import tokenize_splits
    from toto.tokenizers.base import get_tokenizer
    from toto.vocab import VocabLayout

    data, tok_path, _ = _tiny_setup(tmp_path)
    tok = get_tokenizer(tok_path)
    layout, spec, ds = VocabLayout(n_codes=tok.n_codes), SequenceSpec("image"), scan_dataset(data)
    args = (ds, tok, layout, spec, {"tok": 1})
    clean, _ = tokenize_splits(*args, tmp_path / "clean", batch_size=5, chunk_size=5, progress=False)
    assert [len(clean[s].labels) for s in ("train", "val")] == [16, 8]  # 17 train files, one broken

    encode, calls = tok.encode, []

    def dying_encode(frames):
        calls.append(len(frames))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode(frames)

    tok.encode = dying_encode
    with pytest.raises(KeyboardInterrupt):
        tokenize_splits(*args, tmp_path / "c", batch_size=5, chunk_size=5, progress=False)
    done = sorted(p.name for p in (tmp_path / "c").glob("*/train_*.safetensors"))
    assert done == ["train_00000.safetensors", "train_00001.safetensors"]
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "c").glob("*/train_*.safetensors"))]
    tok.encode = encode
    got, cache = tokenize_splits(*args, tmp_path / "c", batch_size=5, chunk_size=5, progress=False)
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("train_0000[01].safetensors"))] == stamps
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split].tokens, clean[split].tokens)
        np.testing.assert_array_equal(got[split].labels, clean[split].labels)
    assert [Path(x["path"]).name for x in got["train"].skipped] == ["broken.jpg"] and got["val"].skipped == []
    assert got["train"].tokens.shape == (16, 6)  # [3] + 2x2 codes + [2]


# -- bad input: one clear line, exit code 2 ----------------------------------------------------

def test_errors_are_one_clear_line(tmp_path, capsys):
    from PIL import Image

    from toto.tokenizers.patch import PatchTokenizer

    data, tok, run = _tiny_setup(tmp_path)
    out = tmp_path / "o"

    def fails(args, match):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("toto finetune: error:") and "\n" not in err and match in err, err

    fails(_args(run, tok, data, out, "--layer", "3"), "--layer 3 out of range: this model has layers 0..2")
    fails(_args(run, tok, data, out, "--epochs", "0"), "epochs")
    fails(_args(run, tok, data, out, "--ntp-weight", "-1"), "--ntp-weight: must be >= 0")
    fails(_args(run, tok, data, out, "--probe-lr", "0"), "probe lr")
    fails(_args(run, tok, data, out, "--until", "0"), "--until")
    other = tmp_path / "other.safetensors"
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    PatchTokenizer.fit(frames, n_codes=5, patch=8, resolution=16).save(other)
    fails(_args(run, other, data, out), "vocabulary is 12 ids but the tokenizer has 5 codes")

    one = tmp_path / "one"
    for split in ("train", "val"):
        (one / split / "only").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), 9 * i, np.uint8)).save(one / split / "only" / f"{i}.png")
    fails(_args(run, tok, one, out), "at least 2 classes")

    broken_val = unreadable_val_dataset(tmp_path / "bv")
    fails(_args(run, tok, broken_val, out), "0 val sample(s)")


# -- it learns: digits ---------------------------------------------------------------------------

def test_finetuning_on_digits_learns(tmp_path):
    """scikit-learn's digits at 16 px, a 4x4 grid of patch codes: fine-tuning a tiny model (random
    init: its pre-training is not what this checks) with CE + NTP ends far above chance (10%)
    and above where its first epoch left it."""
    from toto.data.samples import write_digit_folders
    from toto.data.lists import scan_dataset
    from toto.tokenizers.patch import PatchTokenizer
    from toto.data.images import read_image

    data = write_digit_folders(tmp_path / "digits", size=16)
    ds = scan_dataset(data, max_per_class=60)
    frames = np.stack([read_image(s.path, 16) for s in ds.splits["train"]])
    PatchTokenizer.fit(frames, n_codes=16, patch=4, resolution=16, seed=0).save(tmp_path / "tok.safetensors")
    tiny_checkpoint(tmp_path / "run", 16, 32)
    out = tmp_path / "out"
    assert main(["finetune", "--checkpoint", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok.safetensors"),
                 "--data", str(data), "--out", str(out), "--max-per-class", "60", "--epochs", "10",
                 "--batch-size", "30", "--lr", "1e-3", "--probe-lr", "1e-2", "--no-progress"]) == 0
    rep = json.loads((out / "results.json").read_text())
    assert rep["n_train"] == 600 and rep["n_classes"] == 10 and rep["final"]["val_top5"] is not None
    first, final = rep["first_epoch"]["val_top1"], rep["final"]["val_top1"]
    assert final > 0.5, rep["epochs"]
    assert final > first + 0.1, (first, final)
    ntp = [r["val_ntp"] for r in rep["epochs"]]
    assert ntp[-1] < ntp[0]  # the NTP term trains the trunk to predict the codes too
