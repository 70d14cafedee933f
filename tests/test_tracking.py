"""Label propagation: a dense reference, the neighbourhood rule, model-feature alignment, and the
synthetic DAVIS set end to end through `toto track` (propagation beats copying the first mask)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toto.cli import main
from toto.errors import CheckpointError, DataError
from toto.eval import davis
from toto.eval import tracking as tr
from toto.eval.synthetic import make_synthetic_davis


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_davis(tmp_path_factory.mktemp("davis"), n_sequences=2, n_frames=10,
                                size=(64, 112), speed=4.0, seed=1)


# ------------------------------------------------------------------ propagation core

def dense_reference(query, keys, labels, topk, temperature, radius):
    """DINO's formulation: exp(cos / T) masked to the neighbourhood, keep values >= the k-th
    largest over all context cells, normalise, multiply labels."""
    h, w, D = query.shape
    n, C = labels.shape[:2]
    q = query.reshape(h * w, D)
    k = keys.reshape(n, h * w, D)
    aff = torch.exp(torch.einsum("qd,nsd->nqs", q, k) / temperature)  # (n, Q, S)
    if radius > 0:
        mask = torch.zeros(h * w, h * w)
        for i in range(h):
            for j in range(w):
                for a in range(h):
                    for b in range(w):
                        if abs(a - i) <= radius and abs(b - j) <= radius:
                            mask[i * w + j, a * w + b] = 1
        aff = aff * mask
    aff = aff.permute(0, 2, 1).reshape(n * h * w, h * w)  # (sources, queries)
    kth = aff.topk(topk, dim=0).values.min(0).values
    aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
    aff = aff / aff.sum(0, keepdim=True)
    segs = labels.permute(0, 2, 3, 1).reshape(n * h * w, C)
    return (segs.T @ aff).reshape(C, h, w)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_propagate_frame_matches_dense_reference(radius):
    g = torch.Generator().manual_seed(radius)
    h, w, D, n, C = 7, 9, 16, 3, 4
    query = F.normalize(torch.randn(h, w, D, generator=g), dim=-1)
    keys = F.normalize(torch.randn(n, h, w, D, generator=g), dim=-1)
    labels = torch.softmax(torch.randn(n, C, h, w, generator=g), dim=1)
    got = tr.propagate_frame(query, keys, labels, topk=5, temperature=0.1, radius=radius, band=3)
    want = dense_reference(query.double(), keys.double(), labels.double(), 5, 0.1, radius)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_neighbourhood_excludes_far_matches():
    # the query at (0, 0) is identical to the key at (5, 5) (label 1) and only similar to the
    # key at (0, 1) (label 2); with radius 1 the far exact match must be ignored
    h = w = 6
    keys = torch.zeros(1, h, w, 3)
    keys[..., 2] = 1.0
    keys[0, 5, 5] = torch.tensor([1.0, 0, 0])
    keys[0, 0, 1] = F.normalize(torch.tensor([1.0, 0.5, 0]), dim=0)
    query = keys[0].clone()
    query[0, 0] = torch.tensor([1.0, 0, 0])
    labels = torch.zeros(1, 3, h, w)
    labels[0, 0] = 1
    labels[0, :, 5, 5] = torch.tensor([0, 1.0, 0])
    labels[0, :, 0, 1] = torch.tensor([0, 0, 1.0])
    near = tr.propagate_frame(query, keys, labels, topk=1, temperature=0.1, radius=1)
    anywhere = tr.propagate_frame(query, keys, labels, topk=1, temperature=0.1, radius=0)
    assert near[:, 0, 0].argmax() == 2
    assert anywhere[:, 0, 0].argmax() == 1


def test_context_is_first_frame_plus_most_recent(monkeypatch):
    T, h, w = 7, 3, 3
    feats = F.normalize(torch.randn(T, h, w, 4), dim=-1)
    first = torch.zeros(2, h, w)
    first[1] = 1
    seen = []
    real = tr.propagate_frame

    def spy(query, keys, labels, *a, **k):
        seen.append([int(i) for q in keys for i in range(T) if torch.equal(q, feats[i])])
        return real(query, keys, labels, *a, **k)

    monkeypatch.setattr(tr, "propagate_frame", spy)
    tr.propagate(feats, first, tr.PropagationConfig(n_last=2))
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]
    # n_last=0: frame 0 alone; identical features everywhere then copy its labels exactly
    same = feats[:1].repeat(T, 1, 1, 1)
    soft = tr.propagate(same, first, tr.PropagationConfig(n_last=0, topk=1, radius=0))
    for t in range(T):
        torch.testing.assert_close(soft[t], first)


def test_labels_to_grid_area_average_and_void():
    lab = np.zeros((4, 4), np.uint8)
    lab[0:2, 0:2] = 1
    lab[2, 2:4] = 2
    lab[3, 3] = 2
    lab[3, 0] = davis.VOID  # void counts as background for propagation
    g = tr.labels_to_grid(lab, 3, (2, 2))
    np.testing.assert_allclose(g[1].numpy(), [[1, 0], [0, 0]])
    np.testing.assert_allclose(g[2].numpy(), [[0, 0], [0, 0.75]])
    np.testing.assert_allclose(g.sum(0).numpy(), np.ones((2, 2)))


def test_sizes_and_radius_scaling():
    assert tr.target_size((480, 854), 128, 8, "keep-aspect") == (128, 224)
    assert tr.target_size((854, 480), 128, 8, "keep-aspect") == (224, 128)
    assert tr.target_size((480, 854), 128, 8, "square") == (128, 128)
    assert tr.scaled_radius((60, 104)) == 12   # DINO's own grid keeps its radius
    assert tr.scaled_radius((16, 16)) == 3
    assert tr.scaled_radius((2, 2)) == 1


def test_norm_mask_rescales_each_object_map():
    soft = torch.zeros(1, 2, 2, 2)
    soft[0, 0] = torch.tensor([[0.6, 0.6], [0.6, 0.9]])  # background
    soft[0, 1] = torch.tensor([[0.4, 0.0], [0.0, 0.1]])  # object: weak but peaked at (0, 0)
    plain = tr.soft_to_masks(soft, (2, 2), norm_mask=False)
    normed = tr.soft_to_masks(soft, (2, 2), norm_mask=True)
    np.testing.assert_array_equal(plain[0], [[0, 0], [0, 0]])
    # background rescaled to [[0, 0], [0, 1]], object to [[1, 0], [0, .25]]
    np.testing.assert_array_equal(normed[0], [[1, 0], [0, 0]])


# ------------------------------------------------------------------ synthetic set

def test_synthetic_set_layout_and_motion(synth):
    seqs = davis.list_sequences(synth)
    assert [s.name for s in seqs] == ["synth-000", "synth-001"]
    frames, first, gt = seqs[0].load()
    assert frames.shape == (10, 64, 112, 3) and gt.shape == (10, 64, 112)
    assert set(np.unique(gt)) == {0, 1, 2}
    for obj in (1, 2):  # objects move: their centroids travel several pixels
        ys, xs = np.nonzero(gt[0] == obj)
        ye, xe = np.nonzero(gt[-1] == obj)
        assert np.hypot(ye.mean() - ys.mean(), xe.mean() - xs.mean()) > 8


def _track(synth, out, *extra):
    code = main(["track", "--data", str(synth), "--out", str(out), "--no-progress", *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def test_pixels_beat_copy_first_mask_end_to_end(synth, tmp_path, capsys):
    copy = _track(synth, tmp_path / "copy", "--features", "copy-first")
    pix = _track(synth, tmp_path / "pix", "--features", "pixels", "--resolution", "64", "--patch", "4")
    printed = capsys.readouterr().out
    assert "overall" in printed and "J&F" in printed
    assert pix["overall"]["J&F-Mean"] > copy["overall"]["J&F-Mean"] + 0.3
    assert pix["overall"]["J&F-Mean"] > 0.6
    assert pix["overall"]["n_objects"] == 4
    # the written PNGs are DAVIS results: palette PNGs that re-score to the reported numbers
    out = tmp_path / "pix"
    for seq in davis.list_sequences(synth):
        _, _, gt = seq.load()
        pred = np.stack([davis.read_mask(out / seq.name / f"{p.stem}.png") for p in seq.frames])
        again = davis.evaluate_sequence(seq.name, gt, pred).summary()
        row = next(s for s in pix["sequences"] if s["sequence"] == seq.name)
        assert again["J&F-Mean"] == pytest.approx(row["J&F-Mean"])
    assert (out / "overlay_synth-000.gif").stat().st_size > 0
    # a rerun with the same settings reuses the scored sequences (masks untouched)
    png = out / "synth-001" / "00005.png"
    before = png.stat().st_mtime_ns
    again = _track(synth, out, "--features", "pixels", "--resolution", "64", "--patch", "4")
    assert png.stat().st_mtime_ns == before
    assert again["overall"] == pix["overall"]


def test_bad_sequences_are_skipped_and_counted(synth, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "bad"
    shutil.copytree(synth, root)
    (root / "Annotations/480p/synth-000/00000.png").unlink()
    res = _track(root, tmp_path / "o1", "--features", "copy-first")
    assert list(res["skipped"]) == ["synth-000"] and "first frame" in res["skipped"]["synth-000"]
    assert [s["sequence"] for s in res["sequences"]] == ["synth-001"]
    # a mask whose size differs from its frame
    m = root / "Annotations/480p/synth-001/00003.png"
    lab = davis.read_mask(m)
    davis.write_mask(m, np.asarray(Image.fromarray(lab).resize((50, 30), Image.NEAREST)))
    with pytest.raises(DataError, match="does not match its frame size"):
        davis.list_sequences(root, names=["synth-001"])[0].load()
    assert main(["track", "--data", str(root), "--out", str(tmp_path / "o2"), "--no-progress",
                 "--features", "copy-first"]) == 2  # nothing left to track: one-line error


def test_empty_first_frame_is_skipped_and_partial_ground_truth_is_not_scored(synth, tmp_path):
    import shutil

    root = tmp_path / "partial"
    shutil.copytree(synth, root)
    first = root / "Annotations/480p/synth-000/00000.png"
    davis.write_mask(first, np.zeros_like(davis.read_mask(first)))
    (root / "Annotations/480p/synth-001/00004.png").unlink()  # a later frame without ground truth
    res = _track(root, tmp_path / "o", "--features", "pixels", "--resolution", "32", "--patch", "4")
    assert "no objects" in res["skipped"]["synth-000"]
    assert res["not_scored"] == ["synth-001"] and res["sequences"] == [] and res["overall"] == {}
    assert len(list((tmp_path / "o" / "synth-001").glob("*.png"))) == 10  # masks still written


# ------------------------------------------------------------------ model features

@pytest.fixture(scope="module")
def tiny_run(synth, tmp_path_factory):
    """A patch tokenizer fitted on the synthetic frames and a random-init tiny toto checkpoint."""
    from toto.config import preset
    from toto.model.llama import Toto
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import VocabLayout

    d = tmp_path_factory.mktemp("run")
    frames, _, _ = davis.list_sequences(synth)[0].load()
    tok = PatchTokenizer.fit(tr.resize_frames(frames, (64, 64)), n_codes=32, patch=8, resolution=64)
    tok.save(d / "tok.safetensors")
    cfg = preset("tiny")
    cfg.model.n_layers, cfg.model.dim, cfg.model.n_heads, cfg.model.ffn_dim = 2, 64, 4, 128
    cfg.model.vocab_size, cfg.model.max_seq_len = VocabLayout(n_codes=32).vocab_size, 1 + 4 * 64
    torch.manual_seed(0)
    model = Toto(cfg.model)
    save_checkpoint(d / "run", 1, model, cfg, {"vocab": VocabLayout(n_codes=32).to_dict(),
                                                "tokenizer": tok.identity()})
    return d, tok, model


def test_layer0_features_are_the_cells_own_token_embeddings(synth, tiny_run):
    from toto.vocab import CODE_OFFSET

    _, tok, model = tiny_run
    frames, _, _ = davis.list_sequences(synth)[0].load()
    feats = tr.ModelFeatures(model, tok, layer=0)(frames[:3])
    codes = tok.encode(tr.resize_frames(frames[:3], (64, 64)))
    want = F.normalize(model.tok_emb.weight[torch.from_numpy(codes) + CODE_OFFSET], dim=-1)
    torch.testing.assert_close(feats, want.detach())


def test_video_context_features_match_a_direct_forward(synth, tiny_run):
    from toto.vocab import CODE_OFFSET, VIDEO_START

    _, tok, model = tiny_run
    frames, _, _ = davis.list_sequences(synth)[0].load()
    feats = tr.ModelFeatures(model, tok, layer=2, context="video", video_frames=3)(frames[:4])
    codes = torch.from_numpy(tok.encode(tr.resize_frames(frames[:4], (64, 64)))).reshape(4, -1) + CODE_OFFSET
    seq = torch.cat([torch.tensor([VIDEO_START]), codes[1:4].reshape(-1)])[None]  # frames 1..3 -> 3
    want = F.normalize(model.hidden_states(seq, [2])[2][0, -64:], dim=-1).reshape(8, 8, -1)
    torch.testing.assert_close(feats[3], want)


def test_model_features_beat_copy_first_mask(synth, tiny_run, tmp_path):
    d, _, _ = tiny_run
    copy = _track(synth, tmp_path / "copy", "--features", "copy-first")
    res = _track(synth, tmp_path / "model", "--checkpoint", str(d / "run"), "--tokenizer",
                 str(d / "tok.safetensors"), "--layer", "1")
    assert res["settings"]["layer"] == 1 and res["settings"]["features"] == "model"
    assert res["overall"]["J&F-Mean"] > copy["overall"]["J&F-Mean"] + 0.1


def test_checkpoint_tokenizer_mismatches_are_refused(synth, tiny_run, tmp_path):
    from toto.eval.features import SequenceSpec
    from toto.eval.backbone import load_backbone
    from toto.tokenizers.patch import PatchTokenizer

    d, tok, model = tiny_run
    other = PatchTokenizer(np.zeros((16, 8 * 8 * 3), np.float32), patch=8, resolution=64)
    other.save(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="n_codes 32 there vs 16 here"):
        load_backbone(d / "run", tmp_path / "other.safetensors", SequenceSpec("image"), "cpu")
    bigger = PatchTokenizer(tok.codebook, patch=8, resolution=128)  # same codes, other resolution
    bigger.save(tmp_path / "bigger.safetensors")
    with pytest.raises(CheckpointError, match="resolution"):
        load_backbone(d / "run", tmp_path / "bigger.safetensors", SequenceSpec("image"), "cpu")
    assert main(["track", "--data", str(synth), "--out", str(tmp_path / "o"), "--no-progress",
                 "--checkpoint", str(d / "run"), "--tokenizer", str(tmp_path / "other.safetensors")]) == 2
