import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import write_shards
from toto.cli import main
from toto.config import build_config
from toto.errors import TrainingError
from toto.ioutil import read_jsonl
from toto.train.trainer import Trainer

TINY = ["model.n_layers=2", "model.dim=32", "model.n_heads=2", "model.ffn_dim=64",
        "train.micro_batch_size=4", "train.batch_tokens=144", "train.warmup_steps=5",
        "train.eval_interval=10", "train.log_interval=1", "train.tensorboard=false", "train.lr=3e-3"]


def cfg_for(data, out, steps, *extra):
    return build_config("tiny", None, TINY + [f"data.path={data}", f"train.out_dir={out}",
                                              f"train.max_steps={steps}", *extra])


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_loss_falls_well_below_uniform(tmp_path):
    data = write_shards(tmp_path / "d", n_seq=96)
    s = Trainer(cfg_for(data, tmp_path / "run", 60), progress=False).fit()
    assert s.uniform_loss == pytest.approx(math.log(36))
    assert s.val_loss < 0.7 * s.uniform_loss and s.train_loss < 0.7 * s.uniform_loss
    ck = tmp_path / "run" / "checkpoints" / "step_00000060"
    assert (ck / "model.safetensors").is_file() and (ck / "optimizer.safetensors").is_file()
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 60 and state["vocab"]["vocab_size"] == 36


def test_resume_reproduces_uninterrupted_curve(tmp_path):
    data = write_shards(tmp_path / "d", n_seq=48)
    Trainer(cfg_for(data, tmp_path / "a", 16), progress=False).fit()
    Trainer(cfg_for(data, tmp_path / "b", 16), progress=False).fit(until=7)
    Trainer(cfg_for(data, tmp_path / "b", 16), resume=True, progress=False).fit()
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == len(b) == 16
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


def test_nan_loss_is_an_error(tmp_path, monkeypatch):
    data = write_shards(tmp_path / "d", n_seq=48)
    tr = Trainer(cfg_for(data, tmp_path / "run", 5), progress=False)
    real = tr.forward

    def poisoned(x, t):
        logits, loss = real(x, t)
        return logits, loss * float("nan")

    tr.forward = poisoned
    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        tr.fit()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index.json not found" in err[0]
    data = write_shards(tmp_path / "d", n_seq=48)
    assert main(["train", "--preset", "tiny", "--data", str(data), "model.dim=130"]) == 2
    assert "model.dim=130 is not divisible" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_curve(tmp_path):
    """A real SIGKILL in the middle of `toto train`, then `--resume`."""
    data = write_shards(tmp_path / "d", n_seq=48)
    args = ["--preset", "tiny", "--data", str(data), "--steps", "40", "--no-progress", *TINY,
            "train.ckpt_interval=5"]
    exe = [sys.executable, "-m", "toto.cli", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(exe + args + ["--out", str(tmp_path / "a")], check=True, env=env, capture_output=True)

    run = tmp_path / "b"
    proc = subprocess.Popen(exe + args + ["--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step_00000015").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it was killed"
    r = subprocess.run(exe + args + ["--out", str(run), "--resume"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = losses(tmp_path / "a"), losses(run)
    assert len(a) == len(b) == 40
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6


def test_resolution_finetune_from_checkpoint(tmp_path, capsys):
    """16-token frames -> 64-token frames: weights load unchanged, RoPE base 50k is stored."""
    from safetensors.torch import load_file

    low = write_shards(tmp_path / "low", n_seq=48, grid=(2, 2))
    high = write_shards(tmp_path / "high", n_seq=48, grid=(4, 4))
    Trainer(cfg_for(low, tmp_path / "a", 3), progress=False).fit()
    src = tmp_path / "a" / "checkpoints" / "step_00000003"
    assert main(["train", "--preset", "tiny", "--data", str(high), "--out", str(tmp_path / "b"),
                 "--steps", "2", "--no-progress", "--init-from", str(src), *TINY,
                 "model.n_layers=7"]) == 0  # architecture comes from the checkpoint, not the flags
    start = capsys.readouterr().out.splitlines()[0]  # the start line says what runs
    from toto.device import resolve_device
    from toto.train.optim import uses_bf16

    device = resolve_device("auto")  # train.device defaults to auto: CUDA where there is one
    precision = "bf16 autocast" if uses_bf16(device, "auto") else "fp32"
    assert "2 layers, width 32" in start
    assert start.endswith(f"{device}, {precision}, torch.compile off, data parallel: none"), start
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert saved["model"]["rope_base"] == 50000.0 and saved["model"]["max_seq_len"] == 2 + 4 * 16
    assert saved["model"]["n_layers"] == 2

    tr = Trainer(cfg_for(high, tmp_path / "c", 2, "model.rope_base=50000"), init_from=src, progress=False)
    before = load_file(str(src / "model.safetensors"))
    assert all(torch.equal(tr.model.state_dict()[k], v) for k, v in before.items())
    assert tr.model.rope_cos.shape[0] == 66 and tr.model.cfg.rope_base == 50000.0
    x = torch.randint(4, 36, (1, 66))
    assert tr.model(x).shape == (1, 66, 36)
