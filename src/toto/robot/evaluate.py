"""Success rate of a policy over seeded rollouts, with a Wilson 95% interval and a gif of one.

Rollout seeds start at 10000 by default, apart from the demonstrations' seeds (0, 1, ...), so a
policy is never evaluated on a scene it was trained on. Rollouts run in ``workers`` processes,
each with its own simulator and a copy of the policy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError
from ..ioutil import atomic_write_bytes, atomic_write_json

EVAL_SEED = 10_000


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rollout(policy, env, seed: int, record: bool = False) -> dict:
    obs = env.reset(seed)
    policy.reset()
    frames = [obs.frame] if record else None
    done, success = False, False
    while not done:
        obs, success, done = env.step(policy.act(obs.frame, obs.proprio))
        if record:
            frames.append(obs.frame)
    return {"seed": seed, "success": success, "steps": env.steps, "frames": frames}


_W: dict = {}


def _init_worker(policy_dir: str, task: str, horizon: int) -> None:
    import torch

    from .env import MetaWorldTask
    from .policy import Policy

    torch.set_num_threads(1)
    pol = Policy.load(policy_dir)
    _W["policy"], _W["env"] = pol, MetaWorldTask(task, pol.spec.resolution or 128, horizon=horizon)


def _run_one(job: tuple[int, bool]) -> dict:
    seed, record = job
    return rollout(_W["policy"], _W["env"], seed, record)


def save_gif(frames: list[np.ndarray], path: Path, fps: int = 20) -> None:
    import io

    from PIL import Image

    imgs = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    atomic_write_bytes(path, buf.getvalue())


def evaluate(policy_dir: str | Path, episodes: int, out: str | Path, task: str | None = None,
             seed: int = EVAL_SEED, workers: int = 1, horizon: int | None = None, progress: bool = True) -> dict:
    """Roll ``policy_dir`` out on seeds ``seed .. seed+episodes-1``; writes ``eval.json`` and
    ``rollout.gif`` (the first seed) into ``out``."""
    import json
    import multiprocessing as mp

    from .env import HORIZON, resolve_task

    if episodes < 1 or workers < 1:
        raise ConfigError(f"--episodes and --workers must be >= 1 (got {episodes}, {workers})")
    policy_dir = Path(policy_dir)
    spec_file = policy_dir / "policy.json"
    if not spec_file.is_file():
        raise ConfigError(f"{policy_dir}: not a policy folder (no policy.json)")
    spec = json.loads(spec_file.read_text())
    if not (task or spec.get("task")):
        raise ConfigError(f"{policy_dir}: the policy names no simulation task (LeRobot demos); give --task")
    task = resolve_task(task or spec.get("task"))
    if spec.get("proprio_dim") != 4 or spec.get("action_dim") != 4:
        raise ConfigError(f"{policy_dir}: trained on {spec.get('proprio_dim')}-d proprioception and "
                          f"{spec.get('action_dim')}-d actions; Meta-World needs 4 and 4")
    horizon = horizon or HORIZON
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed + i, i == 0) for i in range(episodes)]
    results = []
    bar = tqdm(total=episodes, desc=f"eval {task}", unit="rollout", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            _init_worker(str(policy_dir), task, horizon)
            for j in jobs:
                results.append(_run_one(j))
                bar.update(1)
            _W["env"].close()
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(min(workers, episodes), _init_worker, (str(policy_dir), task, horizon)) as pool:
                for r in pool.imap_unordered(_run_one, jobs):
                    results.append(r)
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: r["seed"])
    gif = results[0].pop("frames")
    for r in results[1:]:
        r.pop("frames")
    save_gif(gif, out / "rollout.gif")
    k = sum(r["success"] for r in results)
    lo, hi = wilson_interval(k, len(results))
    report = {"policy": str(policy_dir), "task": task, "encoder": spec.get("encoder"), "layers": spec.get("layers"),
              "context": spec.get("context"), "episodes": len(results), "successes": k,
              "success_rate": k / len(results), "ci95": [lo, hi], "horizon": horizon, "first_seed": seed,
              "gif": str(out / "rollout.gif"), "rollouts": results}
    atomic_write_json(out / "eval.json", report)
    return report
