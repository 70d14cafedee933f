"""Bad input and hostile conditions: one line on stderr and exit 2, never a traceback; nothing
half-used, nothing half-written. Each case here once crashed, was silently replaced by a
default, or silently used half a file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_shards

from toto.cli import build_parser, main
from toto.errors import DataError

# -- fixtures: tiny real inputs ----------------------------------------------------------------


def _images(root: Path, n: int = 4, size: int = 16) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def _patch_tokenizer(path: Path) -> Path:
    """32 codes of 8x8 patches at 16 px: a 2x2 grid, the geometry of conftest's write_shards."""
    from toto.tokenizers.patch import PatchTokenizer

    frames = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    PatchTokenizer.fit(frames, n_codes=32, patch=8, resolution=16).save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Shards, a matching tokenizer, images and a 2-step run with a checkpoint (shared)."""
    root = tmp_path_factory.mktemp("inputs")
    shards = write_shards(root / "shards", n_seq=24)
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(shards), "--out", str(run), "--steps", "2",
                 "train.ckpt_interval=1", "train.eval_interval=1", "train.batch_tokens=64",
                 "train.micro_batch_size=4", "--no-progress"]) == 0
    tok, images = _patch_tokenizer(root / "tok.safetensors"), _images(root / "img")
    assert main(["tokenize", str(images), "--tokenizer", str(tok), "--out", str(root / "tok_shards"),
                 "--frames", "2", "--workers", "0", "--no-progress"]) == 0
    return {"shards": shards, "tok": tok, "images": images, "run": run, "root": root,
            "tok_shards": root / "tok_shards"}


def _copy_run(inputs, tmp_path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(inputs["run"], run)
    from toto.train.checkpoint import latest_checkpoint

    return run, latest_checkpoint(run)


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# -- the table: (case, setup(inputs, tmp_path) -> (argv, words the line must contain)) ------------

def _tok_train(inputs, tmp_path, out, *extra):
    return ["tokenizer", "train", "--kind", "patch", "--media", inputs["images"], "--out", out,
            "--resolution", "16", "--n-codes", "4", "--max-frames", "4", "--no-progress", *extra]


def _resume(inputs, tmp_path, corrupt):
    run, ckpt = _copy_run(inputs, tmp_path)
    corrupt(ckpt)
    return ["train", "--out", run, "--resume", "--steps", "3", "--no-progress"], [ckpt.name]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _latest_outside(inputs, tmp_path):
    run, ckpt = _copy_run(inputs, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "step_00000099"
    shutil.copytree(ckpt, elsewhere)
    (run / "checkpoints" / "latest").write_text("../../elsewhere/step_00000099")
    return ["export", "--checkpoint", run, "--hf", tmp_path / "hf"], ["latest", "not to a checkpoint of this run"]


def _binary_config(inputs, tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    return ["train", "--config", tmp_path / "bin.yaml", "--data", inputs["shards"], "--out", tmp_path / "r"], \
        ["bin.yaml", "not a UTF-8 text file"]


def _lists_out_dir(inputs, tmp_path):
    from test_lists import _imagenet

    fake = _imagenet(tmp_path)
    return ["lists", "imagenet", "--val-dir", fake["root"] / "val", "--solution", fake["csv"], "--out", tmp_path,
            "--no-progress"], [str(tmp_path), "is a folder"]


CASES = {
    "tokenizer train --n-codes 0": lambda i, t: (_tok_train(i, t, t / "t.safetensors", "--n-codes", "0"),
                                                 ["--n-codes", "must be > 0"]),
    "tokenizer train --out DIR": lambda i, t: (_tok_train(i, t, t), [str(t), "is a folder"]),
    "params --vocab 0": lambda i, t: (["params", "--vocab", "0"], ["--vocab"]),
    "params --vocab -5": lambda i, t: (["params", "--vocab", "-5"], ["--vocab"]),
    "detokenize --fps 0": lambda i, t: (["detokenize", "--data", i["shards"], "--tokenizer", i["tok"], "--out",
                                         t / "x", "--fps", "0"], ["--fps"]),
    "detokenize --fps -4": lambda i, t: (["detokenize", "--data", i["shards"], "--tokenizer", i["tok"], "--out",
                                          t / "x", "--fps", "-4"], ["--fps"]),
    "train --until 0": lambda i, t: (["train", "--data", i["shards"], "--out", t / "r", "--until", "0"], ["--until"]),
    "coordcheck --steps -3": lambda i, t: (["coordcheck", "--steps", "-3", "--out", t / "c"], ["--steps"]),
    "quickstart --moving-digits -3": lambda i, t: (["quickstart", "--out", t / "q", "--moving-digits", "-3"],
                                                   ["--moving-digits"]),
    "quickstart --frames 0": lambda i, t: (["quickstart", "--out", t / "q", "--frames", "0"], ["--frames"]),
    "quickstart --steps 0": lambda i, t: (["quickstart", "--out", t / "q", "--steps", "0"], ["--steps"]),
    "--threads 0": lambda i, t: (["params", "--threads", "0"], ["--threads"]),
    "lists --out DIR": _lists_out_dir,
    "train --out under a file": lambda i, t: ((t / "f").write_text("x") and None) or (
        ["train", "--preset", "tiny", "--data", i["shards"], "--out", t / "f" / "run", "--steps", "1"],
        ["not a folder"]),
    "model.max_seq_len=1e11 (out of memory)": lambda i, t: (
        ["train", "--preset", "tiny", "--data", i["shards"], "--out", t / "r", "--steps", "1",
         "model.max_seq_len=1e11"], ["out of memory"]),
    "model.max_seq_len=1e9 (out of memory, at once)": lambda i, t: (
        ["train", "--preset", "tiny", "--data", i["shards"], "--out", t / "r", "--steps", "1",
         "model.max_seq_len=1e9"], ["out of memory", "model.max_seq_len=1000000000", "GiB"]),
    "binary --config": _binary_config,
    "truncated optimizer.safetensors": lambda i, t: _resume(i, t, lambda c: _truncate(c / "optimizer.safetensors")),
    "garbled optimizer.json": lambda i, t: _resume(i, t, lambda c: (c / "optimizer.json").write_text('{"a": [1,')),
    "latest pointing outside the run": _latest_outside,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2(case, inputs, tmp_path, capsys):
    argv, words = CASES[case](inputs, tmp_path)
    err = _one_line_error(capsys, argv)
    for w in words:
        assert w in err, (w, err)


def test_quickstart_checks_overrides_before_stage_1(tmp_path, capsys):
    err = _one_line_error(capsys, ["quickstart", "--out", tmp_path / "q", "model.n_layers=0"])
    assert "model.n_layers" in err
    assert not (tmp_path / "q" / "media").exists()  # no stage ran


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_output_is_one_line_and_leaves_no_tmp(code, inputs, tmp_path, capsys, monkeypatch):
    """A read-only or forbidden folder at the final rename (root ignores permission bits, so the
    refusal is injected where the kernel would raise it); nothing is left half-written."""
    out = tmp_path / "o" / "tok.safetensors"
    real_replace = os.replace

    def refuse(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse)
    err = _one_line_error(capsys, _tok_train(inputs, tmp_path, out))
    assert f"{out}: {'read-only file system' if code == errno.EROFS else 'permission denied'}" in err
    assert not out.parent.exists()  # nothing left, not even the folder made for it


def test_full_disk_is_one_line_and_leaves_no_tmp(tmp_path, capsys):
    """A real ENOSPC from the kernel: the temporary file the atomic write fills is Linux's
    /dev/full (every write to it fails with "no space left on device")."""
    from test_lists import _imagenet

    fake = _imagenet(tmp_path)
    out = tmp_path / "o" / "val.txt"
    out.parent.mkdir()
    (out.parent / "val.txt.tmp").symlink_to("/dev/full")
    err = _one_line_error(capsys, ["lists", "imagenet", "--val-dir", fake["root"] / "val", "--solution", fake["csv"],
                                   "--out", out, "--no-progress"])
    assert "no space left on device" in err
    assert list(out.parent.iterdir()) == []


def test_closed_pipe_ends_quietly(inputs):
    """`toto tokenizer info F | head`: the reader is gone before we write."""
    p = subprocess.Popen([sys.executable, "-m", "toto.cli", "tokenizer", "info", str(inputs["tok"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


# -- options anywhere (one parser class for every command) ------------------------------------------

def test_common_options_on_every_command_and_anywhere():
    parser = build_parser()
    leaves = list(parser.leaves())
    assert len(leaves) >= 18  # every command and every action of grouped commands
    for leaf in leaves:
        assert "--threads" in leaf.format_help() and "--no-progress" in leaf.format_help(), leaf.prog
    a = parser.parse_args(["tokenizer", "convert-dalle", "--encoder", "e", "--decoder", "d", "--out", "o",
                           "--threads", "1"])
    assert a.threads == 1 and a.out == "o"
    a = parser.parse_args(["scaling", "run", "--grid", "grid.yaml", "--out", "o", "--threads", "2", "--no-progress"])
    assert a.threads == 2 and a.no_progress
    assert parser.parse_args(["coordcheck", "--no-progress"]).no_progress
    a = parser.parse_args(["lists", "kinetics", "--csv", "c", "--videos", "v", "--out", "o", "--threads", "1"])
    assert a.threads == 1
    a = parser.parse_args(["train", "a.b=1", "--out", "R", "c.d=2", "--threads", "1"])
    assert a.overrides == ["a.b=1", "c.d=2"] and a.out == "R"
    a = parser.parse_args(["tokenize", "in1", "--out", "S", "in2", "--tokenizer", "t"])
    assert a.inputs == ["in1", "in2"]


# -- media: truncated videos, 16-bit PNGs, BOMs -------------------------------------------------------

def _faststart_mp4(path: Path, n: int = 96, size: int = 64) -> Path:
    """An H.264 mp4 with its index at the front (``movflags=faststart``, as most web video)."""
    from fractions import Fraction

    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=Fraction(24))
        s.pix_fmt, s.width, s.height = "yuv420p", size, size
        for _ in range(n):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def _threaded_frames(path: Path) -> int:
    """Frames PyAV's threaded decoding yields without complaint (the old behaviour)."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return sum(1 for _ in c.decode(s))


def test_truncated_faststart_mp4_is_refused_not_half_used(tmp_path):
    from toto.data.video import iter_video

    good = _faststart_mp4(tmp_path / "good.mp4")
    assert sum(1 for _ in iter_video(good, 1, 32)) == 96
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.3)])
    assert 0 < _threaded_frames(cut) < 96  # the premise: threaded decoding swallows the error
    with pytest.raises(DataError, match="cut.mp4: truncated or corrupt data"):
        list(iter_video(cut, 1, 32))
    # cut exactly between two frames: no partial packet, but the index lists more frames
    import av

    with av.open(str(good)) as c:
        pos = [p.pos for p in c.demux(video=0) if p.size][40]
    edge = tmp_path / "edge.mp4"
    edge.write_bytes(good.read_bytes()[:pos])
    with pytest.raises(DataError, match="edge.mp4: truncated file: its index lists 96 frames, the file holds 40"):
        list(iter_video(edge, 1, 32))


def test_tokenize_skips_a_truncated_video_and_names_it(tmp_path, capsys):
    """The truncated file contributes no sequence and is named with the reason; the good one
    is kept whole."""
    vids = tmp_path / "v"
    vids.mkdir()
    good = _faststart_mp4(vids / "good.mp4", n=64, size=16)
    (vids / "cut.mp4").write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.3)])
    tok = _patch_tokenizer(tmp_path / "tok.safetensors")
    assert main(["tokenize", str(vids), "--tokenizer", str(tok), "--out", str(tmp_path / "s"), "--frames", "4",
                 "--stride", "4", "--workers", "0", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["videos_skipped"] == 1 and summary["sequences"] == 4, summary
    (skip,) = summary["skipped"]
    assert skip["path"].endswith("cut.mp4") and "truncated" in skip["reason"]


def test_16_bit_grayscale_png_is_scaled_by_bit_depth(tmp_path):
    from PIL import Image

    from toto.data.images import read_image

    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = read_image(tmp_path / "g16.png", 32)  # same size: no resampling
    expected = np.round(values / 257.0).astype(np.uint8)
    assert np.array_equal(img[..., 0], expected) and np.array_equal(img[..., 2], expected)
    assert abs(img.mean() - 127.4) < 0.5  # was 254.8 (clipped to white)


def test_list_file_with_utf8_bom(tmp_path):
    from toto.data.media import find_media

    _images(tmp_path / "img", n=2)
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffimg/0.png\r\nimg/1.png\r\n".encode("utf-8"))
    assert find_media([lst])[1] == [tmp_path / "img" / "0.png", tmp_path / "img" / "1.png"]


def test_detokenize_into_a_folder_writes_no_hidden_files(inputs, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["detokenize", "--data", str(inputs["tok_shards"]), "--tokenizer", str(inputs["tok"]), "--index",
                 "1", "--out", f"{out}/"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sequence_1.mp4", "sequence_1.png"]


def test_truncated_probe_cache_chunk_is_named(tmp_path):
    import torch

    from toto.eval.cache import ChunkCache
    from toto.eval.features import SplitFeatures

    cache = ChunkCache(tmp_path, {"t": 1}, ["train"])
    cache.put("train", 0, {"layer0": np.zeros((4, 3, 8), np.float16)}, 4)
    feats = SplitFeatures(cache, "train", torch.zeros(4, dtype=torch.long))
    assert feats.layer(0).shape == (4, 3, 8)
    _truncate(cache.folder / "train_00000.safetensors")
    with pytest.raises(DataError, match="train_00000.safetensors: corrupt or truncated cache file"):
        feats.layer(0)


# -- a write that fails half-way leaves neither the file nor a *.tmp -----------------------------

def _tiny_model():
    from toto.config import build_config
    from toto.model.llama import Toto

    cfg = build_config("tiny", None, ["model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
                                      "model.vocab_size=40", "model.max_seq_len=32"])
    return Toto(cfg.model), cfg


def _checkpoint(tmp_path):
    from toto.train.checkpoint import save_checkpoint

    model, cfg = _tiny_model()
    save_checkpoint(tmp_path / "run", 1, model, cfg, {"tokens": 0})


def _export(tmp_path):
    from toto.model.export import save_hf

    save_hf(_tiny_model()[0], tmp_path / "hf")


def _feature_cache(tmp_path):
    import torch

    from toto.robot.bc import cached_features

    cached_features(lambda x: torch.zeros(len(x), 4), np.zeros((3, 8, 8, 3), np.uint8), np.arange(3)[:, None],
                    tmp_path / "features", {"encoder": "zeros"}, progress=False)


@pytest.mark.parametrize("write", [_checkpoint, _export, _feature_cache])
def test_failed_write_leaves_no_tmp(write, tmp_path, monkeypatch):
    """The disk fills while safetensors writes (part of the file is on disk): the error comes
    through, and no partial file or *.tmp file or folder is left for a reader to trip on."""
    import safetensors.torch

    def full_disk(tensors, filename, *a, **k):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    for module in ("safetensors.torch", "safetensors.numpy", "toto.train.checkpoint", "toto.model.export"):
        monkeypatch.setattr(f"{module}.save_file", full_disk)
    assert safetensors.torch.save_file is full_disk
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path)
    left = [p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() or "tmp" in p.name]
    assert left == [], left


def _disk_fills_on_call(monkeypatch, target: str, n: int, path_arg: int = 0) -> None:
    """The disk fills during the ``n``-th call of ``target`` (a writer whose argument ``path_arg``
    is the file), after part of the file is written."""
    import importlib

    module, name = target.rsplit(".", 1)
    real, calls = getattr(importlib.import_module(module), name), []

    def write(*a, **k):
        calls.append(path := Path(a[path_arg]))
        if len(calls) == n:
            path.with_name(path.name + ".tmp").write_bytes(b"partial")  # what a full disk leaves mid-write
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(*a, **k)

    monkeypatch.setattr(target, write)


def test_full_disk_during_tokenize_is_one_line_and_resumes_to_the_same_shards(inputs, tmp_path, capsys, monkeypatch):
    """The disk fills while the second shard is written: one line, exit 2; after space is freed
    `--resume` ends with the bytes of an uninterrupted run."""
    argv = ["tokenize", inputs["images"], "--tokenizer", inputs["tok"], "--frames", "1", "--shard-size", "1",
            "--workers", "0", "--no-progress"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "clean"]]) == 0
    with monkeypatch.context() as m:
        _disk_fills_on_call(m, "toto.data.shards.atomic_write_bytes", 2)
        err = _one_line_error(capsys, [*argv, "--out", tmp_path / "full"])
    assert "no space left on device" in err
    assert main([str(a) for a in [*argv, "--out", tmp_path / "full", "--resume"]]) == 0
    clean = {p.name: p.read_bytes() for p in (tmp_path / "clean").glob("*.bin")}
    assert len(clean) == 4 and {p.name: p.read_bytes() for p in (tmp_path / "full").glob("*.bin")} == clean


def test_full_disk_during_train_checkpoint_is_one_line_and_resumes(inputs, tmp_path, capsys, monkeypatch):
    """The disk fills while the step-2 checkpoint is written: one line, exit 2, step 1 kept;
    `--resume` then ends where an uninterrupted run ends (same losses, same weights)."""
    from safetensors.torch import load_file

    argv = ["train", "--preset", "tiny", "--data", inputs["shards"], "--steps", "3", "train.ckpt_interval=1",
            "train.eval_interval=100", "train.log_interval=1", "train.batch_tokens=64", "train.micro_batch_size=4",
            "--no-progress"]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "clean"]]) == 0
    with monkeypatch.context() as m:
        _disk_fills_on_call(m, "toto.train.checkpoint.save_file", 3, path_arg=1)  # step 1: model + optimizer; step 2: model
        err = _one_line_error(capsys, [*argv, "--out", tmp_path / "full"])
    assert "no space left on device" in err
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_00000001"]
    assert main([str(a) for a in ["train", "--out", tmp_path / "full", "--resume", "--steps", "3", "--no-progress"]]) == 0
    from toto.ioutil import read_jsonl

    loss = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r] for d in ("clean", "full")]
    assert loss[0] == loss[1] and len(loss[0]) == 3
    a, b = (load_file(str(tmp_path / d / "checkpoints" / "step_00000003" / "model.safetensors")) for d in ("clean", "full"))
    assert all(torch.equal(a[k], b[k]) for k in a)
