"""Run folders under faults: a new run never destroys an old one, two writers never share a
folder, a bare --resume continues with the run's own settings, unfinished shard folders are
refused, and a finished run resumed keeps a strict-JSON summary."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import write_shards
from toto.cli import main
from toto.ioutil import dir_lock, read_jsonl

TINY = ["--preset", "tiny", "--no-progress", "model.n_layers=2", "model.dim=32", "model.n_heads=2",
        "model.ffn_dim=64", "train.micro_batch_size=4", "train.batch_tokens=144", "train.warmup_steps=2",
        "train.eval_interval=4", "train.log_interval=1", "train.tensorboard=false", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("d") / "shards", n_seq=40)


def train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def steps_on_disk(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_new_run_into_existing_run_is_refused_and_overwrite_clears(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, "--steps", "8", "train.ckpt_interval=2") == 0
    before = steps_on_disk(out)
    assert before == ["step_00000004", "step_00000006", "step_00000008"]
    metrics = (out / "metrics.jsonl").read_bytes()
    one_line_error(capsys, train(data, out, "--steps", "4", "train.ckpt_interval=2"), str(out), "--resume",
                   "--overwrite")
    assert steps_on_disk(out) == before and (out / "metrics.jsonl").read_bytes() == metrics
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"

    assert train(data, out, "--steps", "4", "train.ckpt_interval=2", "--overwrite") == 0
    assert steps_on_disk(out) == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_second_writer_is_refused_while_the_first_holds_the_folder(data, tmp_path, capsys):
    out = tmp_path / "run"
    with dir_lock(out, "test"):
        one_line_error(capsys, train(data, out, "--steps", "2"), str(out), "being written", str(os.getpid()))
        code = main(["tokenize", str(tmp_path), "--tokenizer", str(tmp_path / "none.safetensors"), "--out", str(out)])
        assert code == 2  # refused (missing tokenizer or the lock): never writes into a held folder
    assert not (out / "checkpoints").exists()
    assert train(data, out, "--steps", "2") == 0  # released


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    """flock dies with its process: a SIGKILLed writer leaves nothing that blocks the next one."""
    out = tmp_path / "held"
    code = textwrap.dedent(f"""
        import sys, time
        from toto.ioutil import dir_lock
        with dir_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        from toto.ioutil import FolderLockedError
        with pytest.raises(FolderLockedError, match=f"pid {proc.pid}"):
            with dir_lock(out):
                pass
    finally:
        proc.kill()
        proc.wait()
    with dir_lock(out):  # the lock file is still there, its lock is not
        assert (out / ".toto.lock").exists()


def test_clearing_a_held_folder_keeps_its_lock(tmp_path):
    """--overwrite and quickstart --fresh clear the folder they hold: everything goes but the
    lock, so a second job is still refused (removing the lock file let it lock a new one)."""
    from toto.ioutil import FolderLockedError, clear_folder

    out = tmp_path / "run"
    with dir_lock(out, "test"):
        (out / "checkpoints" / "step_1").mkdir(parents=True)
        (out / "metrics.jsonl").write_text("{}\n")
        clear_folder(out)
        assert [p.name for p in out.iterdir()] == [".toto.lock"]
        probe = subprocess.run([sys.executable, "-c", f"from toto.ioutil import dir_lock\nwith dir_lock({str(out)!r}): pass"],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and FolderLockedError.__name__ in probe.stderr, probe.stderr
    assert not (out / ".toto.lock").exists()  # released and removed


def test_bare_resume_keeps_the_runs_settings(data, tmp_path, capsys):
    settings = ["--steps", "12", "train.ckpt_interval=3", "train.eval_interval=6", "train.lr=5e-3"]
    assert train(data, tmp_path / "full", *settings) == 0
    assert train(data, tmp_path / "cut", *settings, "--until", "6") == 0
    # a changed learning rate or batch is refused, naming the fields
    for bad, field in (("train.lr=1e-2", "train.lr"), ("train.micro_batch_size=2", "train.micro_batch_size"),
                       ("model.dim=64", "model.dim")):
        err = one_line_error(capsys, main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress",
                                           bad]), field)
        assert "other settings" in err
    # bare --resume: no data path, no preset, no settings: the saved ones
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    full = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    cut = [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert len(full) == len(cut) == 12 and max(abs(a - b) for a, b in zip(full, cut)) < 1e-6
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())["train"]
    assert saved["max_steps"] == 12 and saved["ckpt_interval"] == 3 and saved["lr"] == 5e-3

    # a finished run resumed: nothing to do, and summary.json stays strict JSON with the last losses
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0
    text = (tmp_path / "cut" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert summary["train_loss"] == pytest.approx(cut[-1])
    assert summary["val_loss"] == [r["val_loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")
                                   if "val_loss" in r][-1]
    # extending a run is a legitimate change: applied and recorded
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress", "--steps", "14"]) == 0
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["train"]["max_steps"] == 14
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 14


def test_unfinished_shard_folder_is_refused_unless_allowed(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", n_seq=40)
    index = json.loads((shards / "index.json").read_text())
    index["complete"] = False
    (shards / "index.json").write_text(json.dumps(index))
    one_line_error(capsys, train(shards, tmp_path / "r", "--steps", "2"), "unfinished", "--allow-incomplete")
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert train(shards, tmp_path / "r", "--steps", "2", "--allow-incomplete") == 0


def test_sigterm_saves_a_consistent_checkpoint_and_resumes_exactly(data, tmp_path):
    """Schedulers (Slurm, Kubernetes) send SIGTERM before killing: the run finishes its step,
    saves, exits 143, and --resume continues on the uninterrupted curve."""
    import signal
    import time

    args = [sys.executable, "-m", "toto.cli", "train", "--data", str(data), *TINY, "--steps", "60",
            "train.ckpt_interval=1000"]  # no periodic checkpoint: only the signal writes one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    run = tmp_path / "cut"
    proc = subprocess.Popen(args + ["--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run / "metrics.jsonl")) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err, err
    saved = steps_on_disk(run)
    assert len(saved) == 1 and int(saved[0][5:]) < 60, saved
    r = subprocess.run(args + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    full = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    cut = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(full) == len(cut) == 60 and max(abs(a - b) for a, b in zip(full, cut)) < 1e-6


def test_damaged_weights_are_refused_by_checksum(data, tmp_path, capsys):
    """4 KiB of finite garbage inside model.safetensors keeps its header valid (safetensors
    loads it); the checksum recorded at write refuses it on resume and on load."""
    import numpy as np

    out = tmp_path / "run"
    assert train(data, out, "--steps", "2", "train.ckpt_interval=2") == 0
    f = out / "checkpoints" / "step_00000002" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    garbage = np.random.default_rng(0).standard_normal(1024).astype(np.float32).tobytes()
    raw[-4096:] = garbage
    f.write_bytes(bytes(raw))
    from safetensors.torch import load_file
    assert all(v.isfinite().all() for v in load_file(str(f)).values())  # safetensors alone accepts it
    one_line_error(capsys, main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress"]),
                   "model.safetensors", "checksum")
    from toto.errors import CheckpointError
    from toto.train.checkpoint import load_model
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(out)


# every command that writes, with what its --out is; M is a missing input: each job takes its
# lock before reading any input, so a missing one tells a job that got past the lock
_M = "{tmp}/missing"
WRITERS = {
    "train": (["train", "--data", "{shards}", "--steps", "1", *TINY], "folder"),
    "tokenize": (["tokenize", "{images}", "--tokenizer", "{tok}", "--frames", "2", "--workers", "0", "--no-progress"],
                 "folder"),
    "tokenizer train": (["tokenizer", "train", "--kind", "patch", "--media", _M], "file"),
    "tokenizer convert-dalle": (["tokenizer", "convert-dalle", "--encoder", _M, "--decoder", _M], "file"),
    "tokenizer convert-vqgan": (["tokenizer", "convert-vqgan", "--checkpoint", _M], "file"),
    "lists imagenet": (["lists", "imagenet", "--val-dir", _M, "--solution", _M], "file"),
    "lists kinetics": (["lists", "kinetics", "--csv", _M, "--videos", _M], "file"),
    "lists cater": (["lists", "cater", "--root", _M], "folder"),
    "detokenize": (["detokenize", "--data", _M, "--tokenizer", _M], "file"),
    "export": (["export", "--checkpoint", _M], "file"),  # the HF folder is swapped in whole
    "probe": (["probe", "--checkpoint", _M, "--tokenizer", _M, "--data", _M], "folder"),
    "finetune": (["finetune", "--checkpoint", _M, "--tokenizer", _M, "--data", _M], "folder"),
    "track": (["track", "--data", _M, "--checkpoint", _M, "--tokenizer", _M], "folder"),
    "forecast": (["forecast", "--checkpoint", _M, "--tokenizer", _M, "--data", _M], "folder"),
    "cater": (["cater", "--checkpoint", _M, "--tokenizer", _M, "--data", _M], "folder"),
    "quickstart": (["quickstart", "model.n_layers=0"], "folder"),
    "anticipate train": (["anticipate", "train", "--checkpoint", _M, "--tokenizer", _M, "--clips", _M,
                          "--detections", _M, "--annotations", _M], "folder"),
    "anticipate predict": (["anticipate", "predict", "--run", _M, "--annotations-file", _M, "--clips", _M,
                            "--detections", _M], "file"),
    "robot collect": (["robot", "collect", "--task", "no-such-task"], "folder"),
    "robot videos": (["robot", "videos", "--demos", _M], "folder"),
    "robot train": (["robot", "train", "--demos", _M], "folder"),
    "robot eval": (["robot", "eval", "--policy", _M], "folder"),
    "robot ppo": (["robot", "ppo", "--task", "no-such-task", "--checkpoint", _M, "--tokenizer", _M], "folder"),
    "synth cater": (["synth", "cater", "--videos", "1", "--frames", "0"], "folder"),
    "synth sta": (["synth", "sta", "--width", "3"], "folder"),
    "scaling run": (["scaling", "run", "--grid", _M], "folder"),
    "coordcheck": (["coordcheck", "--widths", "8"], "folder"),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Four 16 px images and a 32-code patch tokenizer for them (tokenize's inputs)."""
    import numpy as np
    from PIL import Image

    from toto.tokenizers.patch import PatchTokenizer

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    PatchTokenizer.fit(rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), n_codes=32, patch=8,
                       resolution=16).save(root / "tok.safetensors")
    return {"images": root / "img", "tok": root / "tok.safetensors"}


def _hold(target, kind):
    """Another process holding ``target``'s lock until it is killed."""
    code = textwrap.dedent(f"""
        import time
        from toto.ioutil import dir_lock, file_lock
        with {"dir_lock" if kind == "folder" else "file_lock"}({str(target)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_refuses_a_held_output_and_takes_over_a_dead_holders(command, data, media, tmp_path, capsys):
    """A second job against a live holder of its output gets one line (exit 2) naming the output
    and the holder; once the holder is SIGKILLed (its lock file stays, its flock does not) the
    job gets past the lock, and releases it without leaving the file."""
    argv, kind = WRITERS[command]
    out = tmp_path / ("out" if kind == "folder" else "out.file")
    lock = out / ".toto.lock" if kind == "folder" else tmp_path / ".out.file.lock"
    flag = "--hf" if command == "export" else "--out"
    argv = [a.format(tmp=tmp_path, shards=data, **media) for a in argv] + [flag, str(out)]
    holder = _hold(out, kind)
    try:
        err = one_line_error(capsys, main(argv), str(out), "being written", f"pid {holder.pid}")
        assert f"another toto {argv[0]}" in err
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # what a killed holder leaves: a file without a lock
    code = main(argv)
    err = capsys.readouterr().err
    assert "being written" not in err and "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    assert not lock.exists()


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writer_names_an_unwritable_output_in_one_line(command, data, media, tmp_path, capsys, monkeypatch):
    """A read-only output folder (root ignores permission bits, so the kernel's EROFS is injected
    where it would come: at the first file the job creates there) and an output path under a
    file: one line naming the folder, exit 2, nothing created."""
    import errno

    argv, kind = WRITERS[command]
    flag = "--hf" if command == "export" else "--out"
    argv = [a.format(tmp=tmp_path, shards=data, **media) for a in argv]
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro if kind == "folder" else ro / "out.file"
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(ro)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)
        one_line_error(capsys, main([*argv, flag, str(out)]), f"{ro}: read-only file system")
    assert list(ro.iterdir()) == []

    (tmp_path / "afile").write_text("x")
    one_line_error(capsys, main([*argv, flag, str(tmp_path / "afile" / "out")]), f"{tmp_path / 'afile'}: not a folder")
    if kind == "folder":
        one_line_error(capsys, main([*argv, flag, str(tmp_path / "afile")]), f"{tmp_path / 'afile'}: is a file")


def test_torn_last_metrics_line_is_tolerated_on_resume(data, tmp_path, capsys):
    """A kill during an append tears the last line of metrics.jsonl; --resume drops it (the
    step is logged again) instead of failing until the file is edited by hand."""
    out = tmp_path / "run"
    assert train(data, out, "--steps", "8", "train.ckpt_interval=4", "--until", "4") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # torn: no closing brace, no newline
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    # a bad line in the middle is damage, not a kill: named, one line
    lines = (out / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{garbled"
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    from toto.errors import DataError
    with pytest.raises(DataError, match=r"metrics.jsonl:3: not a JSON record"):
        read_jsonl(out / "metrics.jsonl")


def test_a_tokenizer_of_the_same_shape_with_another_codebook_is_refused_on_resume(media, tmp_path, capsys):
    """Two patch tokenizers that differ only in their codebook: `tokenize --resume`, `train
    --resume` and `train --init-from` against the other one's shards are refused with one line
    naming both weight fingerprints (the identity once compared shapes only)."""
    import hashlib

    import numpy as np

    from toto.tokenizers.patch import PatchTokenizer

    cb = np.random.default_rng(1).uniform(0, 255, (32, 8 * 8 * 3)).astype(np.float32)
    codebooks = {"a": cb, "b": cb[::-1].copy()}  # same shape, same codes, other order
    prints = {}
    for name, codebook in codebooks.items():
        PatchTokenizer(codebook, patch=8, resolution=16).save(tmp_path / f"{name}.safetensors")
        prints[name] = hashlib.sha256(b"codebook" + codebook.tobytes()).hexdigest()[:16]  # tensor name + bytes
    assert prints["a"] != prints["b"]

    images = tmp_path / "img"
    images.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(64):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")

    def tokenize(tok, out, *extra):
        return main(["tokenize", str(images), "--tokenizer", str(tmp_path / f"{tok}.safetensors"), "--out",
                     str(tmp_path / out), "--frames", "4", "--workers", "0", "--no-progress", *extra])

    assert tokenize("a", "sa") == 0 and tokenize("b", "sb") == 0
    capsys.readouterr()
    index = (tmp_path / "sa" / "index.json").read_bytes()
    one_line_error(capsys, tokenize("b", "sa", "--resume"), str(tmp_path / "sa"), prints["a"], prints["b"])
    assert (tmp_path / "sa" / "index.json").read_bytes() == index  # nothing appended

    assert train(tmp_path / "sa", tmp_path / "r", "--steps", "2") == 0
    capsys.readouterr()
    steps = steps_on_disk(tmp_path / "r")
    one_line_error(capsys, main(["train", "--data", str(tmp_path / "sb"), "--out", str(tmp_path / "r"), "--resume",
                                 "--steps", "3", "--no-progress"]), prints["a"], prints["b"])
    assert steps_on_disk(tmp_path / "r") == steps
    one_line_error(capsys, train(tmp_path / "sb", tmp_path / "r2", "--steps", "2", "--init-from", str(tmp_path / "r")),
                   prints["a"], prints["b"])
    assert not (tmp_path / "r2" / "checkpoints").exists()
    assert train(tmp_path / "sa", tmp_path / "r3", "--steps", "2", "--init-from", str(tmp_path / "r")) == 0  # its own
