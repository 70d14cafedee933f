"""Training our own dVAE: the loss terms against torch.distributions, the schedules, resuming
after an interruption, and a short run on real photos that must beat an untrained dVAE."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import conftest
from toto.errors import CheckpointError, ConfigError, DataError
from toto.tokenizers.base import get_tokenizer
from toto.tokenizers.dvae import DVAETokenizer
from toto.tokenizers import train_dvae as td
from toto.tokenizers.stats import psnr
from toto.tokenizers.train_dvae import DVAETrainConfig, codebook_usage, train_dvae


def photo_frames(size: int, n: int, seed: int = 0) -> np.ndarray:
    return conftest.photo_frames(size, n, seed, n_photos=4)


def tiny(**kw) -> DVAETrainConfig:
    base = dict(vocab_size=32, n_hid=8, n_blk_per_group=1, group_count=3, n_init=16, resolution=16,
                steps=30, batch_size=8, lr=3e-3, log_every=5, ckpt_every=10, device="cpu", n_samples=4)
    return DVAETrainConfig(**{**base, **kw})


def test_logit_laplace_nll_matches_change_of_variables():
    """If logit(X) ~ Laplace(mu, b) then log p_X(x) = log p_Laplace(logit x) - log x - log(1 - x)."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 + 0.8 * torch.rand(2, 3, 4, 4, generator=g)
    stats = torch.randn(2, 6, 4, 4, generator=g)
    lap = torch.distributions.Laplace(stats[:, :3], stats[:, 3:].exp())
    logp = lap.log_prob(torch.logit(x)) - torch.log(x) - torch.log1p(-x)
    torch.testing.assert_close(td.logit_laplace_nll(x, stats), -logp.mean())


def test_kl_to_uniform_matches_torch_distributions():
    logits = torch.randn(3, 10, 2, 5, generator=torch.Generator().manual_seed(1))
    q = torch.distributions.Categorical(logits=logits.permute(0, 2, 3, 1))
    u = torch.distributions.Categorical(logits=torch.zeros(3, 2, 5, 10))
    expect = torch.distributions.kl_divergence(q, u).sum((1, 2)).mean()
    torch.testing.assert_close(td.kl_to_uniform(logits), expect)


def test_schedules():
    cfg = tiny(steps=100, tau_start=1.0, tau_end=1 / 16, anneal_frac=0.5, kl_weight=2.0, kl_warmup_frac=0.2,
               lr=1e-3, lr_final_frac=0.1)
    assert td.temperature(cfg, 0) == 1.0
    assert td.temperature(cfg, 25) == pytest.approx(0.25)  # geometric mean of 1 and 1/16, halfway
    assert td.temperature(cfg, 50) == pytest.approx(1 / 16) and td.temperature(cfg, 99) == pytest.approx(1 / 16)
    assert td.kl_weight(cfg, 0) == 0 and td.kl_weight(cfg, 10) == pytest.approx(1.0) and td.kl_weight(cfg, 60) == 2
    assert td.learning_rate(cfg, 0) == pytest.approx(1e-3) and td.learning_rate(cfg, 100) == pytest.approx(1e-4)
    assert td.learning_rate(cfg, 50) == pytest.approx(0.55e-3)


def test_metrics_hand_computed():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] = 1  # MSE 1 -> 10 log10(255^2) = 48.13 dB
    b[1] = 2  # MSE 4 -> 42.11 dB
    assert psnr(a, b, per_frame=True) == pytest.approx((10 * math.log10(255 ** 2) + 10 * math.log10(255 ** 2 / 4)) / 2)
    u = codebook_usage(np.array([[0, 0], [1, 3]]), 8)
    assert u["used"] == 3 and u["usage"] == 3 / 8
    assert u["perplexity"] == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))


def test_bad_frames(tmp_path):
    with pytest.raises(DataError, match="resolution is 16"):
        train_dvae(photo_frames(32, 4), tiny(), tmp_path / "t.safetensors", progress=False)
    with pytest.raises(DataError, match="at least 2 frames"):
        train_dvae(photo_frames(16, 1), tiny(), tmp_path / "t.safetensors", progress=False)
    with pytest.raises(DataError, match="uint8"):
        train_dvae(photo_frames(16, 4).astype(np.float32), tiny(), tmp_path / "t.safetensors", progress=False)


def test_short_training_learns_and_writes_its_files(tmp_path):
    """400 steps on 16px crops of real photos (2x downsampling, 32 codes): the codes must carry
    more than an untrained dVAE's and more than each frame's mean colour."""
    frames = photo_frames(16, 60)
    cfg = tiny(steps=400, val_frac=0.2, group_count=2, lr=1e-2, kl_weight=0.1)
    out = tmp_path / "dvae.safetensors"
    tok, rep = train_dvae(frames, cfg, out, progress=False)
    untrained = DVAETokenizer(cfg.model_config())  # same architecture, initial weights
    val = frames[np.sort(np.random.default_rng(cfg.seed).permutation(60)[:12])]
    before = psnr(val, untrained.decode(untrained.encode(val)), per_frame=True)
    mean_colour = np.broadcast_to(val.reshape(12, -1, 3).mean(1)[:, None, None], val.shape).round().astype(np.uint8)
    after = rep["held_out"]["psnr"]
    assert after == pytest.approx(psnr(val, tok.decode(tok.encode(val)), per_frame=True))  # the report is about val
    assert after > before + 3, (before, after)
    assert after > psnr(val, mean_colour, per_frame=True) + 1, (psnr(val, mean_colour, per_frame=True), after)
    assert rep["held_out"]["used"] >= 4  # more than a collapsed codebook
    assert rep["frames"] == {"train": 48, "held_out": 12, "resolution": 16}
    assert json.loads((tmp_path / "dvae.report.json").read_text())["held_out"] == rep["held_out"]
    assert get_tokenizer(out).identity() == tok.identity()
    from PIL import Image

    grid = Image.open(tmp_path / "dvae.samples.png")
    assert grid.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)
    lines = [json.loads(s) for s in (tmp_path / "dvae.train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 401, 5))


def test_resume_reproduces_an_uninterrupted_run(tmp_path, monkeypatch):
    frames = photo_frames(16, 20)
    cfg = tiny(steps=30, ckpt_every=10)
    full, _ = train_dvae(frames, cfg, tmp_path / "a.safetensors", progress=False)

    real_lr = td.learning_rate

    def crash_at_27(c, step):  # after step 25 is logged, before the next checkpoint (30)
        if step == 27:
            raise KeyboardInterrupt
        return real_lr(c, step)

    monkeypatch.setattr(td, "learning_rate", crash_at_27)
    with pytest.raises(KeyboardInterrupt):
        train_dvae(frames, cfg, tmp_path / "b.safetensors", progress=False)
    assert not (tmp_path / "b.safetensors").exists()
    state = json.loads((tmp_path / "b.train" / "ckpt" / "state.json").read_text())
    assert state["step"] == 20
    monkeypatch.setattr(td, "learning_rate", real_lr)
    resumed, _ = train_dvae(frames, cfg, tmp_path / "b.safetensors", progress=False)
    steps = [json.loads(s)["step"] for s in (tmp_path / "b.train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]  # step 25's record, logged after the checkpoint, is not doubled
    a, b = full.tensors(), resumed.tensors()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_other_config_or_frames(tmp_path):
    frames = photo_frames(16, 10)
    out = tmp_path / "t.safetensors"
    train_dvae(frames, tiny(steps=10), out, progress=False)
    with pytest.raises(ConfigError, match=r"other settings: lr \(0.003 -> 0.01\)"):
        train_dvae(frames, tiny(steps=10, lr=1e-2), out, progress=False)
    with pytest.raises(CheckpointError, match="different frames"):
        train_dvae(photo_frames(16, 10, seed=5), tiny(steps=10), out, progress=False)
    train_dvae(photo_frames(16, 10, seed=5), tiny(steps=10), out, progress=False, resume=False)  # starts over
