"""Demonstrations on disk: scripted-expert episodes we collect, and LeRobot datasets we read.

Our layout (``toto robot collect``):

    DIR/collect.json                  what was asked (task, camera, resolution, horizon, seeds)
    DIR/episodes/seed_000123.npz      a successful expert episode: frames (T, R, R, 3) uint8,
                                      proprio (T, P) float32, actions (T, A) float32, success
    DIR/episodes/seed_000124.failed   an expert episode that did not succeed (counted, excluded)
    DIR/summary.json                  expert success rate, kept and failed seeds

Each episode file is written atomically once the episode is done, so a killed collect resumes at
the first seed without a file. Step t pairs the observation before action t with that action.

LeRobot v2.0/v2.1 layout (Hugging Face's robot-learning format; what a real arm records):

    ROOT/meta/info.json               fps, chunks_size, data_path / video_path templates, features
    ROOT/meta/episodes.jsonl          {"episode_index", "length", "tasks"} per line
    ROOT/data/chunk-000/episode_000000.parquet      one row per frame: observation.state, action,
                                                    timestamp, frame_index, episode_index, ...
    ROOT/videos/chunk-000/<video_key>/episode_000000.mp4   one camera stream per episode

A frame is the video frame at the row's timestamp (round(timestamp * fps)), the LeRobot rule.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..ioutil import atomic_file, atomic_write_bytes, atomic_write_json


@dataclass
class Episode:
    name: str
    frames: np.ndarray  # (T, R, R, 3) uint8
    proprio: np.ndarray  # (T, P) float32
    actions: np.ndarray  # (T, A) float32


# -- collect ------------------------------------------------------------------------------------

def run_expert(env, seed: int) -> tuple[Episode, bool]:
    """One scripted-expert episode; stops at success or at the horizon."""
    obs = env.reset(seed)
    frames, proprio, actions = [], [], []
    done, success = False, False
    while not done:
        a = env.expert_action()
        frames.append(obs.frame)
        proprio.append(obs.proprio)
        actions.append(a)
        obs, success, done = env.step(a)
    return Episode(f"seed_{seed:06d}", np.stack(frames), np.stack(proprio), np.stack(actions)), success


def collect(task: str, episodes: int, out: str | Path, seed: int = 0, max_attempts: int | None = None,
            resolution: int | None = None, horizon: int | None = None, progress: bool = True) -> dict:
    """Run the task's expert on seeds ``seed, seed+1, ...`` until ``episodes`` succeed (at most
    ``max_attempts`` seeds, default 2 x episodes + 10); failed episodes are counted, not kept."""
    from .env import HORIZON, RESOLUTION, MetaWorldTask, resolve_task

    if episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {episodes}")
    task = resolve_task(task)
    out = Path(out)
    ep_dir = out / "episodes"
    ep_dir.mkdir(parents=True, exist_ok=True)
    ask = {"task": task, "seed": seed, "resolution": resolution or RESOLUTION, "horizon": horizon or HORIZON}
    cpath = out / "collect.json"
    if cpath.is_file():
        old = json.loads(cpath.read_text())
        if {k: old.get(k) for k in ask} != ask:
            raise ConfigError(f"{out}: holds a collection with {old}, not {ask}; use another --out")
    atomic_write_json(cpath, {**ask, "episodes": episodes})
    max_attempts = max_attempts or 2 * episodes + 10
    env = None
    kept, failed = [], []
    bar = tqdm(total=episodes, desc=f"collect {task}", unit="episode", disable=not progress, dynamic_ncols=True)
    try:
        for s in range(seed, seed + max_attempts):
            if len(kept) == episodes:
                break
            ok, bad = ep_dir / f"seed_{s:06d}.npz", ep_dir / f"seed_{s:06d}.failed"
            if not ok.is_file() and not bad.is_file():
                env = env or MetaWorldTask(task, ask["resolution"], horizon=ask["horizon"])
                ep, success = run_expert(env, s)
                if success:
                    buf = io.BytesIO()
                    np.savez_compressed(buf, frames=ep.frames, proprio=ep.proprio, actions=ep.actions,
                                        success=np.array(True), seed=np.array(s))
                    atomic_write_bytes(ok, buf.getvalue())
                else:
                    atomic_write_bytes(bad, f"{len(ep.actions)} steps without success\n".encode())
            if ok.is_file():
                kept.append(s)
                bar.update(1)
            else:
                failed.append(s)
    finally:
        bar.close()
        if env is not None:
            env.close()
    attempts = len(kept) + len(failed)
    summary = {**ask, "episodes": len(kept), "requested": episodes, "attempts": attempts,
               "expert_success_rate": len(kept) / attempts if attempts else None,
               "kept_seeds": kept, "failed_seeds": failed}
    atomic_write_json(out / "summary.json", summary)
    if len(kept) < episodes:
        raise DataError(f"{out}: only {len(kept)} of {episodes} expert episodes succeeded in {attempts} seeds "
                        f"(failed seeds {failed[:10]}); the ones that did are kept")
    return summary


# -- read ---------------------------------------------------------------------------------------

def load_demos(path: str | Path, camera: str | None = None, resolution: int | None = None,
               skipped: list | None = None) -> tuple[list[Episode], dict]:
    """Episodes from a ``toto robot collect`` folder or a LeRobot dataset, and what they are
    (``{"format", "task", ...}``). A LeRobot episode that cannot be read is appended to
    ``skipped`` as ``{"episode", "reason"}`` and left out."""
    path = Path(path)
    skipped = [] if skipped is None else skipped
    if (path / "meta" / "info.json").is_file():
        return read_lerobot(path, camera, resolution, skipped)
    if not (path / "episodes").is_dir():
        raise DataError(f"{path}: neither a `toto robot collect` folder (episodes/) nor a LeRobot dataset "
                        f"(meta/info.json)")
    files = sorted((path / "episodes").glob("seed_*.npz"))
    if not files:
        raise DataError(f"{path}/episodes: no successful episodes (seed_*.npz)")
    eps = []
    for f in files:
        with np.load(f) as z:
            eps.append(Episode(f.stem, z["frames"], z["proprio"], z["actions"]))
    info = json.loads((path / "collect.json").read_text()) if (path / "collect.json").is_file() else {}
    return eps, {"format": "toto", "task": info.get("task"), "resolution": info.get("resolution"),
                 "horizon": info.get("horizon")}


def _column(table, key: str, where: str) -> np.ndarray:
    if key not in table.column_names:
        raise DataError(f"{where}: no column {key!r} (has {', '.join(table.column_names)})")
    col = table.column(key).to_pylist()
    return np.asarray(col, dtype=np.float32).reshape(len(col), -1)


def read_lerobot(root: Path, camera: str | None, resolution: int | None, skipped: list) -> tuple[list[Episode], dict]:
    import pyarrow.parquet as pq

    from ..data.video import iter_video

    info = json.loads((root / "meta" / "info.json").read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise DataError(f"{root}: LeRobot codebase_version {version!r}; this reader takes v2.0/v2.1 "
                        f"(per-episode parquet and mp4 files)")
    for key in ("fps", "data_path", "video_path", "features"):
        if key not in info:
            raise DataError(f"{root}/meta/info.json: missing {key!r}")
    videos = sorted(k for k, f in info["features"].items() if f.get("dtype") == "video")
    if not videos:
        raise DataError(f"{root}: no video feature in meta/info.json (image-folder datasets are not read)")
    camera = camera or videos[0]
    if camera not in videos:
        raise ConfigError(f"--camera {camera!r} is not a video stream of {root} (has {', '.join(videos)})")
    res = resolution or 128
    fps, chunk = float(info["fps"]), int(info.get("chunks_size", 1000))
    ep_file = root / "meta" / "episodes.jsonl"
    if not ep_file.is_file():
        raise DataError(f"{ep_file}: missing")
    metas = [json.loads(line) for line in ep_file.read_text().splitlines() if line.strip()]
    eps = []
    for m in metas:
        i = int(m["episode_index"])
        fmt = {"episode_chunk": i // chunk, "episode_index": i, "video_key": camera}
        pfile, vfile = root / info["data_path"].format(**fmt), root / info["video_path"].format(**fmt)
        try:
            if not pfile.is_file():
                raise DataError(f"{pfile}: missing")
            table = pq.read_table(pfile)
            n = table.num_rows
            if "length" in m and int(m["length"]) != n:
                raise DataError(f"{pfile}: {n} rows but meta/episodes.jsonl says length {m['length']}")
            state = _column(table, "observation.state", str(pfile))
            action = _column(table, "action", str(pfile))
            ts = (_column(table, "timestamp", str(pfile))[:, 0] if "timestamp" in table.column_names
                  else np.arange(n) / fps)
            frames = list(iter_video(vfile, 1, res))
            idx = np.rint(ts * fps).astype(int)
            if idx.max(initial=0) >= len(frames):
                raise DataError(f"{vfile}: {len(frames)} video frames but the episode's {n} rows reach "
                                f"timestamp {ts.max():.3f}s (frame {idx.max()} at {fps:g} fps)")
            eps.append(Episode(f"episode_{i:06d}", np.stack([frames[j] for j in idx]), state, action))
        except DataError as e:
            skipped.append({"episode": i, "reason": str(e)})
    if not eps:
        raise DataError(f"{root}: no readable episode ({len(skipped)} skipped; first: {skipped[0]['reason'] if skipped else '-'})")
    return eps, {"format": "lerobot", "task": None, "camera": camera, "fps": fps, "resolution": res,
                 "robot_type": info.get("robot_type")}


def fingerprint(episodes: list[Episode]) -> str:
    """Hash of every episode's arrays: the feature cache key of a demo set."""
    import hashlib

    h = hashlib.sha256()
    for ep in episodes:
        h.update(ep.name.encode())
        for a in (ep.frames, ep.proprio, ep.actions):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def export_videos(demos: str | Path, out: str | Path, fps: float = 20.0) -> list[Path]:
    """Each episode of a demo folder as ``OUT/<episode>.mp4`` (H.264): pre-training data for
    ``toto tokenizer train`` / ``toto tokenize``. Existing files are kept (resumable)."""
    from ..data.video import write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    episodes, _ = load_demos(demos)
    paths = []
    for ep in episodes:
        dst = out / f"{ep.name}.mp4"
        if not dst.is_file():
            with atomic_file(dst) as tmp:
                write_video(ep.frames, tmp, fps=fps)
        paths.append(dst)
    return paths
