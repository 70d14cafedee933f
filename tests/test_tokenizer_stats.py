"""Codebook coverage (`toto tokenizer stats`) for every tokenizer kind, against hand-computed cases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import photo_frames
from toto.cli import main
from toto.data.media import sample_frames
from toto.tokenizers.base import get_tokenizer
from toto.tokenizers.patch import PatchTokenizer
from toto.tokenizers.stats import code_stats, codebook_usage, psnr
from toto.tokenizers.vqgan import VQGANConfig, VQGANTokenizer


def grey_patch_tokenizer() -> PatchTokenizer:
    """4 codes: flat 2x2 patches of grey levels 0, 100, 200, 250; 4 px frames (2x2 codes)."""
    return PatchTokenizer(np.repeat(np.array([0, 100, 200, 250], np.float32)[:, None], 12, 1), patch=2, resolution=4)


def frame(levels: list[int], offset: int) -> np.ndarray:
    """A 4x4 frame whose 2x2 patches (raster order) are flat at ``levels`` plus ``offset``."""
    f = np.zeros((4, 4, 3), np.uint8)
    for i, v in enumerate(levels):
        y, x = divmod(i, 2)
        f[2 * y:2 * y + 2, 2 * x:2 * x + 2] = v + offset
    return f


def test_psnr_pooled_and_per_frame_by_hand():
    """The one PSNR (forecasts, tokenizer reports, dVAE training): pooled over all pixels, or the
    mean of per-frame values, where an exact frame counts at the 1e-10 error floor, not inf."""
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0] += 1  # MSE 1
    b[1] += 2  # MSE 4
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 2.5))
    assert psnr(a, b, per_frame=True) == pytest.approx((10 * math.log10(255 ** 2) + 10 * math.log10(255 ** 2 / 4)) / 2)
    b[1] = 0
    assert psnr(a, b, per_frame=True) == pytest.approx((10 * math.log10(255 ** 2) + 10 * math.log10(255 ** 2 / 1e-10)) / 2)
    assert psnr(a, a) == math.inf
    assert psnr(np.zeros(4), np.full(4, 0.5), data_range=1.0) == pytest.approx(10 * math.log10(4))


def test_coverage_perplexity_and_psnr_hand_computed():
    tok = grey_patch_tokenizer()
    # codes 0,0,0,1 and 0,0,1,2: counts (5, 2, 1, 0); every pixel off by 1 in the first frame
    # and by 2 in the second (the nearest grey level is still the intended one)
    frames = np.stack([frame([0, 0, 0, 100], 1), frame([0, 0, 100, 200], 2)])
    for chunk in (1, 32):
        s, counts = code_stats(tok, frames, chunk=chunk)
        assert counts.tolist() == [5, 2, 1, 0]
        assert (s["positions"], s["used"], s["usage"], s["usage_bound"]) == (8, 3, 0.75, 1.0)
        h = -(5 / 8 * math.log(5 / 8) + 2 / 8 * math.log(2 / 8) + 1 / 8 * math.log(1 / 8))
        assert s["perplexity"] == pytest.approx(math.exp(h), rel=1e-12)
        assert s["psnr"] == pytest.approx((10 * math.log10(255 ** 2 / 1) + 10 * math.log10(255 ** 2 / 4)) / 2)
        assert s["grid"] == [2, 2] and s["frames"] == 2
    # limits: one code everywhere -> perplexity 1; all codes equally -> perplexity = n_codes
    assert codebook_usage(np.zeros((3, 2, 2), np.int64), 4)["perplexity"] == pytest.approx(1.0)
    u = codebook_usage(np.arange(8).reshape(2, 2, 2) % 4, 4)
    assert (u["used"], u["usage"]) == (4, 1.0) and u["perplexity"] == pytest.approx(4.0)


def test_stats_command_on_real_photos_for_patch_and_vqgan(tmp_path, capsys):
    from PIL import Image

    media = tmp_path / "photos"
    media.mkdir()
    for i, f in enumerate(photo_frames(64, 6, seed=7)):
        Image.fromarray(f).save(media / f"{i}.png")
    patch = PatchTokenizer.fit(photo_frames(32, 8, seed=1), n_codes=32, patch=8, resolution=32)
    patch.save(tmp_path / "patch.safetensors")
    VQGANTokenizer(VQGANConfig(n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                               attn_resolutions=(8,), z_channels=16, model_resolution=32, resolution=32)
                   ).save(tmp_path / "vqgan.safetensors")
    for name in ("patch", "vqgan"):
        path = tmp_path / f"{name}.safetensors"
        js, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
        assert main(["tokenizer", "stats", str(path), str(media), "--json", str(js), "--plot", str(png),
                     "--device", "cpu", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert "codes used" in out and "paper" in out
        got = json.loads(js.read_text())
        tok = get_tokenizer(path)
        expect, counts = code_stats(tok, sample_frames([media], 32, 256, seed=0, stride=4))
        assert got["counts"] == counts.tolist() and sum(got["counts"]) == got["positions"] == 6 * tok.grid[0] * tok.grid[1]
        for k in ("used", "usage", "perplexity", "psnr", "usage_bound"):
            assert got[k] == pytest.approx(expect[k]), k
        assert got["kind"] == name and 1 <= got["perplexity"] <= got["used"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_without_media_is_one_line(tmp_path, capsys):
    grey_patch_tokenizer().save(tmp_path / "t.safetensors")
    (tmp_path / "empty").mkdir()
    rc = main(["tokenizer", "stats", str(tmp_path / "t.safetensors"), str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "no videos or images" in err and len(err.strip().splitlines()) == 1
