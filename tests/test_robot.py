"""toto robot: Meta-World demos, behaviour cloning on frozen Toto features, rollouts, PPO, LeRobot
datasets. Tiny everything: 32 px camera, a 2-layer Toto, 1-2 short episodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toto.cli import main

os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo's import, which reads it
pytest.importorskip("metaworld")  # the `robot` extra; the `test` extra installs it, so CI runs these

TASK = "button-press-topdown"  # the experts' shortest CortexBench task (about 65 steps)
RES = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two expert episodes, a patch tokenizer fitted on their frames, a tiny Toto checkpoint."""
    from toto.config import Config, ModelConfig
    from toto.model.llama import Toto
    from toto.robot.demos import load_demos
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import VocabLayout

    d = tmp_path_factory.mktemp("robot")
    assert main(["robot", "collect", "--task", f"{TASK}-v3", "--episodes", "2", "--out", str(d / "demos"),
                 "--resolution", str(RES), "--horizon", "120", "--no-progress"]) == 0
    eps, _ = load_demos(d / "demos")
    frames = np.concatenate([e.frames for e in eps])
    tok = PatchTokenizer.fit(frames, n_codes=24, patch=8, resolution=RES, iters=5)
    tok.save(d / "tok.safetensors")
    layout = VocabLayout(n_codes=24)
    cfg = Config(model=ModelConfig(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=layout.vocab_size,
                                   max_seq_len=1 + 2 * 16, init_std=0.1))
    cfg.train.seed = 5
    torch.manual_seed(0)
    save_checkpoint(d / "run", 1, Toto(cfg.model), cfg, {"vocab": layout.to_dict(), "tokenizer": tok.identity()})
    return {"dir": d, "demos": d / "demos", "eps": eps, "tok": d / "tok.safetensors", "ckpt": d / "run"}


def test_collect_records_replayable_episodes_and_resumes(setup, tmp_path):
    from toto.robot.env import MetaWorldTask

    s = json.loads((setup["demos"] / "summary.json").read_text())
    assert s["task"] == TASK and s["kept_seeds"] == [0, 1] and s["expert_success_rate"] == 1.0
    ep = setup["eps"][0]
    assert ep.frames.shape[1:] == (RES, RES, 3) and ep.frames.dtype == np.uint8
    assert len(ep.frames) == len(ep.proprio) == len(ep.actions) < 120
    assert np.abs(ep.actions).max() <= 1
    # replaying the recorded actions from the seed's scene reproduces the recorded observations and succeeds
    env = MetaWorldTask(TASK, RES, horizon=120)
    obs = env.reset(0)
    for t, a in enumerate(ep.actions):
        np.testing.assert_allclose(obs.proprio, ep.proprio[t], atol=1e-5)
        np.testing.assert_array_equal(obs.frame, ep.frames[t])
        obs, success, done = env.step(a)
    assert success and done
    env.close()

    # resume: a lost episode is redone (identically), a finished one is not touched
    first, second = (setup["demos"] / "episodes" / f"seed_00000{i}.npz" for i in (0, 1))
    mtime, data = first.stat().st_mtime_ns, dict(np.load(second))
    second.unlink()
    assert main(["robot", "collect", "--task", TASK, "--episodes", "2", "--out", str(setup["demos"]),
                 "--resolution", str(RES), "--horizon", "120", "--no-progress"]) == 0
    assert first.stat().st_mtime_ns == mtime
    for k, v in np.load(second).items():
        np.testing.assert_array_equal(v, data[k])

    # an expert that cannot finish within the horizon: episodes counted as failed, kept out, exit 2
    out = tmp_path / "short"
    assert main(["robot", "collect", "--task", TASK, "--episodes", "1", "--out", str(out), "--resolution", "16",
                 "--horizon", "5", "--max-attempts", "2", "--no-progress"]) == 2
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_seeds"] == [0, 1] and s["episodes"] == 0 and s["expert_success_rate"] == 0
    assert not list((out / "episodes").glob("*.npz"))


def test_unknown_task_and_missing_backend(tmp_path, capsys, monkeypatch):
    assert main(["robot", "collect", "--task", "drawer", "--episodes", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'drawer'" in err and "drawer-open, " in err and "hammer" in err

    from toto.robot.env import BackendError, require_backend

    monkeypatch.setitem(sys.modules, "metaworld", None)  # as if the extra were not installed
    with pytest.raises(BackendError, match=r"metaworld is not installed.*toto-video\[robot\]"):
        require_backend()
    monkeypatch.undo()
    # a renderer MuJoCo cannot use: one line naming MUJOCO_GL, exit 2 (a fresh process: MuJoCo reads it at import)
    env = {**os.environ, "MUJOCO_GL": "bogus", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "toto.cli", "robot", "collect", "--task", TASK, "--episodes", "1",
                        "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "MUJOCO_GL='bogus'" in r.stderr and "libegl" in r.stderr.lower()


def test_toto_features_are_the_models_hidden_states(setup):
    from toto.model.llama import Toto
    from toto.robot.policy import TotoEncoder
    from toto.tokenizers.base import get_tokenizer
    from toto.train.checkpoint import load_model

    tok = get_tokenizer(setup["tok"])
    model, cfg, _ = load_model(setup["ckpt"])
    frames = setup["eps"][0].frames[:3]
    enc = TotoEncoder.load(setup["ckpt"], setup["tok"], [1, 2], context=2)
    got = enc(np.stack([frames[:2], frames[1:3]]))  # two windows of 2 frames
    for b, window in enumerate((frames[:2], frames[1:3])):
        ids = np.concatenate([[1], tok.encode(window).reshape(-1) + 4])  # [1] = video start, codes from id 4
        h = model.hidden_states(torch.tensor(ids)[None], [1, 2])
        want = torch.cat([h[1][0, -16:].mean(0), h[2][0, -16:].mean(0)])  # the last frame's 4x4 codes
        torch.testing.assert_close(got[b], want)
    one = TotoEncoder.load(setup["ckpt"], setup["tok"], [2], context=1)(frames[:1, None])
    ids = np.concatenate([[3], tok.encode(frames[:1]).reshape(-1) + 4])  # [3] = image start
    torch.testing.assert_close(one[0], model.hidden_states(torch.tensor(ids)[None], [2])[2][0, 1:].mean(0))
    # random init = the run's step-0 weights (seed of the run's config), not the checkpoint's
    rnd = TotoEncoder.load(setup["ckpt"], setup["tok"], [2], context=1, random_init=True)
    torch.manual_seed(cfg.train.seed)
    ref = Toto(cfg.model)
    torch.testing.assert_close(rnd.model.state_dict(), ref.state_dict())
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in ref.state_dict().items())


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "policy" / "policy.safetensors"))


def test_bc_train_resumes_exactly_and_rollout_uses_the_training_features(setup, tmp_path, monkeypatch):
    from toto.robot import bc

    args = ["robot", "train", "--demos", str(setup["demos"]), "--checkpoint", str(setup["ckpt"]), "--tokenizer",
            str(setup["tok"]), "--layers", "1,2", "--context", "2", "--no-random-init", "--epochs", "4",
            "--batch-size", "32", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "full"), "--cache", str(tmp_path / "cache")]) == 0

    real, calls = bc.save_state, []

    def killed_after_two(path, state):  # the process dies right after epoch 2's state is on disk
        real(path, state)
        calls.append(state["epoch"])
        if state["epoch"] == 2 and len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(bc, "save_state", killed_after_two)
    assert main(args + ["--out", str(tmp_path / "cut"), "--cache", str(tmp_path / "cache")]) == 130
    assert not (tmp_path / "cut" / "toto_L1+2" / "policy").exists()
    assert main(args + ["--out", str(tmp_path / "cut"), "--cache", str(tmp_path / "cache")]) == 0
    assert calls == [1, 2, 3, 4, 1, 2, 3, 4][:len(calls)] and calls[-2:] == [3, 4]  # resumed at epoch 3
    for name in ("toto_L1+2", "cnn"):
        a, b = _weights(tmp_path / "full" / name), _weights(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 1  # features computed once, reused

    # the rollout path (history deque + live encoder) gives the action the head learned from cached features
    from safetensors.torch import load_file

    from toto.robot.policy import Policy, window_index

    pol = Policy.load(tmp_path / "full" / "toto_L1+2" / "policy")
    feats = load_file(str(next((tmp_path / "cache").glob("*/*.safetensors"))))["features"]
    ep = setup["eps"][0]
    assert len(feats) == sum(len(e.actions) for e in setup["eps"])
    np.testing.assert_array_equal(window_index([3, 2], 2), [[0, 0], [0, 1], [1, 2], [3, 3], [3, 4]])
    pol.reset()
    for t in range(4):
        a = pol.act(ep.frames[t], ep.proprio[t])
        with torch.no_grad():
            want = pol.head(feats[t:t + 1], torch.from_numpy(ep.proprio[t:t + 1]))[0].numpy()
        np.testing.assert_allclose(a, want, atol=1e-5)


def test_checkpoint_tokenizer_mismatch(setup, tmp_path, capsys):
    from toto.robot.policy import resize_frames
    from toto.tokenizers.patch import PatchTokenizer

    frames = setup["eps"][0].frames
    # another codebook size (the vocabulary differs), and the same size at another resolution
    for n_codes, res, what in ((16, RES, "n_codes"), (24, 16, "different tokenizer")):
        other = tmp_path / f"tok{n_codes}.safetensors"
        PatchTokenizer.fit(resize_frames(frames, res), n_codes=n_codes, patch=8, resolution=res, iters=3).save(other)
        assert main(["robot", "train", "--demos", str(setup["demos"]), "--checkpoint", str(setup["ckpt"]),
                     "--tokenizer", str(other), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err


def test_eval_parallel_rollouts_ci_and_gif(setup, tmp_path):
    from PIL import Image

    from toto.robot.evaluate import wilson_interval

    assert main(["robot", "train", "--demos", str(setup["demos"]), "--checkpoint", str(setup["ckpt"]),
                 "--tokenizer", str(setup["tok"]), "--layers", "2", "--no-random-init", "--no-cnn", "--epochs", "2",
                 "--out", str(tmp_path / "bc"), "--no-progress"]) == 0
    pol = tmp_path / "bc" / "toto_L2" / "policy"
    assert main(["robot", "eval", "--policy", str(pol), "--episodes", "3", "--workers", "2", "--horizon", "6",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert r["task"] == TASK and [x["seed"] for x in r["rollouts"]] == [10000, 10001, 10002]
    assert all(x["steps"] == 6 or x["success"] for x in r["rollouts"])
    k = sum(x["success"] for x in r["rollouts"])
    assert r["successes"] == k and r["ci95"] == list(wilson_interval(k, 3))
    gif = Image.open(tmp_path / "ev" / "rollout.gif")
    assert gif.n_frames == r["rollouts"][0]["steps"] + 1 and gif.size == (RES, RES)
    # one process gives the same rollouts (seeded scenes, deterministic policy)
    assert main(["robot", "eval", "--policy", str(pol), "--episodes", "3", "--horizon", "6",
                 "--out", str(tmp_path / "ev1"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "ev1" / "eval.json").read_text())["rollouts"] == r["rollouts"]
    # Wilson interval, hand-computed: 0 of n -> [0, z^2 / (n + z^2)]; n of n mirrors it
    z2 = 1.959964 ** 2
    assert wilson_interval(0, 3) == (0.0, pytest.approx(z2 / (3 + z2)))
    assert wilson_interval(3, 3) == (pytest.approx(3 / (3 + z2)), 1.0)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and lo < 0.5 < hi


def test_ppo_on_frozen_toto_features(setup, tmp_path):
    from toto.robot.policy import TotoEncoder
    from toto.robot.rl import load_ppo, make_gym_env, train_ppo

    r = train_ppo(TASK, str(setup["ckpt"]), str(setup["tok"]), [2], 1, steps=48, out=tmp_path / "ppo",
                  n_steps=24, batch_size=12, horizon=12, resolution=RES, progress=False)
    assert r["episodes"] == 4 and r["episode_lengths"] == [12] * 4  # 48 steps = 4 full episodes
    assert r["toto_frozen"]
    enc = TotoEncoder.load(setup["ckpt"], setup["tok"], [2], 1)
    model = load_ppo(tmp_path / "ppo" / "ppo.zip", enc)
    ext = model.policy.features_extractor
    assert all("encoder" not in n for n, _ in model.policy.named_parameters())  # Toto is not trained
    env = make_gym_env(TASK, 1, RES, 12)
    obs, _ = env.reset(seed=3)
    t = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
    with torch.no_grad():
        got = ext({k: v.float() for k, v in t.items()})
    want = torch.cat([enc(obs["frames"][None]), t["proprio"]], 1)
    torch.testing.assert_close(got, want)
    assert ext.features_dim == enc.dim + 4
    env.close()


def _lerobot_dataset(root: Path) -> dict:
    """A LeRobot v2.1 dataset: real H.264 mp4s and real parquet files. Episodes 0 and 1 are fine;
    2 has no video; 3 has more parquet rows than video frames; 4's episodes.jsonl length is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from toto.data.video import write_video

    fps, cam = 10, "observation.images.top"
    info = {"codebase_version": "v2.1", "robot_type": "test_arm", "fps": fps, "chunks_size": 1000,
            "total_episodes": 5, "splits": {"train": "0:5"},
            "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
            "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
            "features": {cam: {"dtype": "video", "shape": [32, 32, 3], "names": ["height", "width", "channels"]},
                         "observation.state": {"dtype": "float32", "shape": [3]},
                         "action": {"dtype": "float32", "shape": [2]},
                         "timestamp": {"dtype": "float32", "shape": [1]},
                         "frame_index": {"dtype": "int64", "shape": [1]},
                         "episode_index": {"dtype": "int64", "shape": [1]}}}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    rng = np.random.default_rng(0)
    rows, video_frames, lengths = [6, 5, 4, 8, 6], [6, 5, None, 5, 6], [6, 5, 4, 8, 7]
    truth = {}
    for i, (n, nv, ln) in enumerate(zip(rows, video_frames, lengths)):
        colours = rng.integers(30, 225, (max(n, nv or 0), 3))
        state = rng.normal(size=(n, 3)).astype(np.float32)
        action = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
        table = pa.table({"observation.state": [list(r) for r in state], "action": [list(r) for r in action],
                          "timestamp": pa.array(np.arange(n) / fps, pa.float32()),
                          "frame_index": np.arange(n), "episode_index": np.full(n, i)})
        pfile = root / f"data/chunk-000/episode_{i:06d}.parquet"
        pfile.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, pfile)
        if nv:
            vfile = root / f"videos/chunk-000/{cam}/episode_{i:06d}.mp4"
            vfile.parent.mkdir(parents=True, exist_ok=True)
            frames = np.broadcast_to(colours[:nv, None, None].astype(np.uint8), (nv, 32, 32, 3))
            write_video(np.ascontiguousarray(frames), vfile, fps=fps)
        truth[i] = (colours[:n], state, action)
        with open(root / "meta" / "episodes.jsonl", "a") as f:
            f.write(json.dumps({"episode_index": i, "tasks": ["pick the cube"], "length": ln}) + "\n")
    return truth


def test_lerobot_dataset_reader_and_bc(tmp_path):
    from toto.robot.demos import load_demos

    truth = _lerobot_dataset(tmp_path / "lr")
    skipped = []
    eps, info = load_demos(tmp_path / "lr", resolution=32, skipped=skipped)
    assert info["format"] == "lerobot" and info["camera"] == "observation.images.top"
    assert [e.name for e in eps] == ["episode_000000", "episode_000001"]
    for e, i in zip(eps, (0, 1)):
        colours, state, action = truth[i]
        np.testing.assert_array_equal(e.proprio, state)
        np.testing.assert_array_equal(e.actions, action)
        np.testing.assert_allclose(e.frames.reshape(len(e.frames), -1, 3).mean(1), colours, atol=6)  # lossy H.264
    reasons = {s["episode"]: s["reason"] for s in skipped}
    assert sorted(reasons) == [2, 3, 4]
    assert "episode_000002.mp4" in reasons[2]
    assert "5 video frames" in reasons[3] and "8 rows" in reasons[3]
    assert "6 rows" in reasons[4] and "length 7" in reasons[4]

    assert main(["robot", "train", "--demos", str(tmp_path / "lr"), "--no-progress", "--epochs", "1",
                 "--out", str(tmp_path / "bc")]) == 0  # no checkpoint: the pixels CNN alone
    r = json.loads((tmp_path / "bc" / "results.json").read_text())
    assert r["format"] == "lerobot" and r["episodes"] == 2 and len(r["skipped_episodes"]) == 3
    spec = json.loads((tmp_path / "bc" / "cnn" / "policy" / "policy.json").read_text())
    assert (spec["proprio_dim"], spec["action_dim"], spec["task"]) == (3, 2, None)
