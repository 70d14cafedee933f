"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 match a single process on the same
global batch, and a checkpoint written by 2 ranks resumes on 1. torchrun with 1 process joins a
group of one and really shards (how a single GPU runs FSDP on NCCL)."""

import json

import os
import subprocess
import sys

import pytest

from conftest import write_shards
from toto.ioutil import read_jsonl

pytestmark = pytest.mark.slow

# 40 sequences of 18 tokens; val_fraction 0.2 leaves 32 train sequences = 4 global batches of 8
COMMON = ["--preset", "tiny", "--no-progress", "--steps", "6",
          "model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
          "data.val_fraction=0.2", "train.micro_batch_size=4", "train.batch_tokens=136",
          "train.warmup_steps=2", "train.log_interval=1", "train.eval_interval=3",
          "train.ckpt_interval=3", "train.tensorboard=false", "train.lr=3e-3"]


def run(args, nproc=None):
    """``nproc=None``: a plain process; a number: under torchrun with that many ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc is None:
        cmd = [sys.executable, "-m", "toto.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "toto.train", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def curve(run_dir, key="loss"):
    return [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("d") / "shards", n_seq=40)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run(["--data", str(data), "--out", str(out), *COMMON])
    return out


@pytest.mark.parametrize("mode,nproc", [("ddp", 2), ("fsdp", 2), ("fsdp", 1)])
def test_ranks_match_one_process(mode, nproc, data, reference, tmp_path):
    run(["--data", str(data), "--out", str(tmp_path), *COMMON, f"train.parallel={mode}"], nproc=nproc)
    assert json.loads((tmp_path / "summary.json").read_text())["parallel"] == f"{mode}/gloo x{nproc}"
    assert json.loads((reference / "summary.json").read_text())["parallel"] == "none"
    ref, got = curve(reference), curve(tmp_path)
    assert len(ref) == len(got) == 6
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)
    assert abs(curve(reference, "val_loss")[-1] - curve(tmp_path, "val_loss")[-1]) < 1e-4


def test_checkpoint_from_two_ranks_resumes_on_one(data, reference, tmp_path):
    run(["--data", str(data), "--out", str(tmp_path), *COMMON, "train.parallel=fsdp", "--until", "3"], nproc=2)
    assert (tmp_path / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    run(["--data", str(data), "--out", str(tmp_path), *COMMON, "--resume"])
    ref, got = curve(reference), curve(tmp_path)
    assert len(got) == 6
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


def test_weighted_mix_on_two_ranks_matches_one(data, tmp_path):
    """Two folders mixed 1:3: two DDP ranks see the global batches one process sees, so the
    loss curve and each source's val loss agree."""
    other = write_shards(tmp_path / "other", n_seq=40, seed=7)
    mix = [*COMMON, "data.weights=1,3"]
    run(["--data", f"{data},{other}", "--out", str(tmp_path / "one"), *mix])
    run(["--data", f"{data},{other}", "--out", str(tmp_path / "two"), *mix, "train.parallel=ddp"], nproc=2)
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert len(one) == len(two) == 6 and max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    keys = [k for k in read_jsonl(tmp_path / "one" / "metrics.jsonl")[-1] if k.startswith("val_loss/")]
    assert len(keys) == 2, keys  # one val loss per source
    for key in keys:
        assert abs(curve(tmp_path / "one", key)[-1] - curve(tmp_path / "two", key)[-1]) < 1e-4


@pytest.mark.parametrize("n_val", [1, 2, 3])
def test_uneven_validation_split_does_not_deadlock(n_val, data, tmp_path):
    """1, 2 or 3 val sequences on 2 ranks: one rank has fewer (or no) val batches, yet every
    rank must issue the same collectives (an FSDP forward is one). Before the fix rank 0 sat in
    a collective and rank 1 in all_reduce forever; the timeout turns a hang into a failure.
    The pooled val loss equals one process's."""
    short = [*COMMON[:COMMON.index("--steps")], "--steps", "2", *COMMON[COMMON.index("--steps") + 2:],
             f"data.val_max_sequences={n_val}", "train.eval_interval=2", "train.eval_batches=2",
             "train.micro_batch_size=2", "train.batch_tokens=68"]
    run(["--data", str(data), "--out", str(tmp_path / "one"), *short])
    ref = curve(tmp_path / "one", "val_loss")
    for mode in ("ddp", "fsdp"):
        run(["--data", str(data), "--out", str(tmp_path / mode), *short, f"train.parallel={mode}"], nproc=2)
        got = curve(tmp_path / mode, "val_loss")
        assert len(got) == len(ref) == 1 and abs(got[0] - ref[0]) < 1e-4, (mode, ref, got)
