"""Patch k-means tokenizer: patch layout, assignment vs brute force, k-means vs scikit-learn,
exact round trips, determinism, file round trip through the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toto.errors import DataError
from toto.tokenizers.base import get_tokenizer
from toto.tokenizers.patch import PatchTokenizer, from_patches, kmeans, nearest, to_patches


def real_frames(n: int = 24, r: int = 32) -> np.ndarray:
    """Real photos (scikit-image) and digits (scikit-learn) at r x r: (n, r, r, 3) uint8."""
    import skimage.data
    from sklearn.datasets import load_digits

    from toto.data.images import array_to_square

    imgs = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.camera()]
    out = [array_to_square(im, r) for im in imgs]
    digits = load_digits().images  # (1797, 8, 8) values 0..16
    for d in digits[: n - len(out)]:
        out.append(array_to_square((d * 15).astype(np.uint8), r))
    return np.stack(out)


def test_patch_layout_is_row_major_and_invertible():
    rng = np.random.default_rng(0)
    f = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    p = to_patches(f, 8)
    assert p.shape == (2, 2, 3, 192)
    for n, i, j in [(0, 0, 0), (1, 1, 2), (0, 1, 1)]:
        np.testing.assert_array_equal(p[n, i, j].numpy(), f[n, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1))
    np.testing.assert_array_equal(from_patches(p, 8).numpy(), f)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 12)).astype(np.float32)
    c = rng.normal(size=(37, 12)).astype(np.float32)
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    idx, dist = nearest(torch.from_numpy(x), torch.from_numpy(c), chunk=64)
    np.testing.assert_array_equal(idx.numpy(), d.argmin(1))
    np.testing.assert_allclose(dist.numpy(), d.min(1), rtol=1e-4, atol=1e-4)


def test_kmeans_recovers_separated_clusters_and_matches_sklearn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(2)
    centers = rng.uniform(0, 255, (8, 6))
    x = np.concatenate([c + rng.normal(0, 2, (200, 6)) for c in centers]).astype(np.float32)
    c, stats = kmeans(torch.from_numpy(x), 8, iters=50, seed=0)
    # each true centre has a fitted centroid within the noise level
    dmin = np.sqrt(((centers[:, None] - c.numpy()[None]) ** 2).sum(-1)).min(1)
    assert (dmin < 1.0).all(), dmin
    assert all(a >= b - 1e-3 for a, b in zip(stats["inertia"], stats["inertia"][1:]))  # Lloyd never increases it
    # on real patches, our inertia is within a few percent of scikit-learn's best of 4 runs
    x = to_patches(real_frames(), 8).reshape(-1, 192).numpy()
    ours = kmeans(torch.from_numpy(x), 16, iters=50, seed=0)[1]["inertia"][-1]
    ref = KMeans(16, n_init=4, random_state=0, max_iter=50).fit(x.astype(np.float64)).inertia_ / len(x)
    assert ours < ref * 1.10, (ours, ref)


def test_fit_encode_decode_and_determinism():
    f = real_frames()
    tok = PatchTokenizer.fit(f, n_codes=32, patch=8, seed=0, iters=15)
    assert tok.grid == (4, 4) and tok.n_codes == 32
    codes = tok.encode(f)
    assert codes.shape == (len(f), 4, 4) and codes.dtype == np.int64
    cb = tok.codebook.numpy()
    brute = ((to_patches(f, 8).numpy()[..., None, :] - cb) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(codes, brute)
    rec = tok.decode(codes)
    expect = from_patches(torch.from_numpy(cb[codes]), 8).numpy().round().clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(rec, expect)
    # fitted centroids reconstruct better than the mean patch alone
    mse = ((rec.astype(float) - f) ** 2).mean()
    mean_patch = to_patches(f, 8).reshape(-1, 192).mean(0)
    mse0 = ((to_patches(f, 8) - mean_patch) ** 2).mean().item()
    assert mse < 0.6 * mse0
    again = PatchTokenizer.fit(f, n_codes=32, patch=8, seed=0, iters=15)
    assert torch.equal(again.codebook, tok.codebook)
    other = PatchTokenizer.fit(f, n_codes=32, patch=8, seed=1, iters=15)
    assert not torch.equal(other.codebook, tok.codebook)


def test_frames_made_of_codebook_patches_round_trip_exactly():
    rng = np.random.default_rng(3)
    cb = rng.integers(0, 256, (10, 4 * 4 * 3)).astype(np.float32)
    tok = PatchTokenizer(cb, patch=4, resolution=8)
    codes = rng.integers(0, 10, (5, 2, 2))
    frames = from_patches(torch.from_numpy(cb[codes]), 4).numpy().astype(np.uint8)
    np.testing.assert_array_equal(tok.encode(frames), codes)
    np.testing.assert_array_equal(tok.decode(codes), frames)


def test_save_load_through_registry(tmp_path):
    f = real_frames(8, 16)
    tok = PatchTokenizer.fit(f, n_codes=8, patch=8, seed=0, iters=5)
    path = tmp_path / "patch.safetensors"
    tok.save(path)
    back = get_tokenizer(path)
    assert isinstance(back, PatchTokenizer) and back.identity() == tok.identity()
    assert back.fit_stats["n_frames"] == 8
    np.testing.assert_array_equal(back.encode(f), tok.encode(f))
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="junk"):
        get_tokenizer(tmp_path / "junk.safetensors")


def test_bad_input_is_a_data_error():
    f = real_frames(4, 16)
    with pytest.raises(DataError, match="at least n_codes"):
        PatchTokenizer.fit(f[:1], n_codes=64, patch=8)
    with pytest.raises(DataError, match="multiple of the patch"):
        PatchTokenizer.fit(f, n_codes=2, patch=8, resolution=12)
    tok = PatchTokenizer.fit(f, n_codes=4, patch=8)
    with pytest.raises(DataError, match="uint8"):
        tok.encode(f.astype(np.float32))
    with pytest.raises(DataError, match="lie in"):
        tok.decode(np.full((1, 2, 2), 4))


def test_identity_hashes_the_weights_and_one_check_refuses_a_mismatch(tmp_path):
    """Same shape, other codebook -> other fingerprint, refused by the shards' resume, by the
    checkpoint check every evaluation runs, and a tokenizer of another resolution too."""
    from toto.config import ModelConfig
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.errors import CheckpointError
    from toto.eval.backbone import check_compatible
    from toto.eval.features import SequenceSpec
    from toto.tokenizers.base import check_identity
    from toto.vocab import VocabLayout
    import hashlib

    rng = np.random.default_rng(0)
    cb = rng.uniform(0, 255, (16, 2 * 2 * 3)).astype(np.float32)
    a, b = PatchTokenizer(cb, patch=2, resolution=8), PatchTokenizer(cb[::-1].copy(), patch=2, resolution=8)
    ref = hashlib.sha256(b"codebook" + cb.tobytes()).hexdigest()[:16]  # independent: name + float32 bytes
    assert a.identity()["weights_sha256"] == ref
    assert b.fingerprint() != a.fingerprint()
    a.save(tmp_path / "a.safetensors")
    assert get_tokenizer(tmp_path / "a.safetensors").identity() == a.identity()
    check_identity(a.identity(), a, "x")  # the same tokenizer passes
    check_identity({k: v for k, v in a.identity().items() if k != "weights_sha256"}, b, "old record")

    layout = VocabLayout(n_codes=16)
    geo = ShardGeometry(a.grid, 1)
    w = ShardWriter(tmp_path / "shards", layout, geo, a.identity(), sequences_per_shard=4)
    w.close()
    with pytest.raises(DataError, match="tokenizer"):
        ShardWriter(tmp_path / "shards", layout, geo, b.identity(), sequences_per_shard=4, resume=True)

    mcfg = ModelConfig(n_layers=1, n_heads=1, dim=8, ffn_dim=8, vocab_size=layout.vocab_size, max_seq_len=64)
    state = {"tokenizer": a.identity(), "vocab": layout.to_dict()}
    assert check_compatible(mcfg, state, a, SequenceSpec("image"), "ck") == layout
    with pytest.raises(CheckpointError, match="weights_sha256"):
        check_compatible(mcfg, state, b, SequenceSpec("image"), "ck")
    half = PatchTokenizer(cb, patch=2, resolution=4)  # same codebook, another resolution
    with pytest.raises(CheckpointError, match="resolution 8 there vs 4 here"):
        check_compatible(mcfg, state, half, SequenceSpec("image"), "ck")
