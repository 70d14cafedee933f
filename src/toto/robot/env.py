"""Meta-World v3 tasks with a 128 px camera and their scripted experts.

The simulator (``metaworld``, ``mujoco``) is an optional extra imported only here, lazily: a user
who only pre-trains installs none of it. Rendering is offscreen; on a machine without a display
MuJoCo needs ``MUJOCO_GL=egl`` (Mesa's libEGL, e.g. ``apt install libegl1``) or ``osmesa``.

Episode seeds: ``reset(seed)`` draws the task's object and goal positions from the seed alone
(Meta-World's own ``seed()`` + ``seeded_rand_vec``), so a seed is one reproducible scene.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, TotoError

# CortexBench's Meta-World tasks (the VC-1 benchmark of frozen visual encoders)
CORTEXBENCH_TASKS = ("assembly", "bin-picking", "button-press-topdown", "drawer-open", "hammer")
CAMERA = "corner2"  # a fixed camera over the table; its image comes upside down, we rotate it 180 degrees
RESOLUTION = 128
HORIZON = 250  # steps before a rollout counts as failed (the experts finish these tasks in 60-210)
PROPRIO_DIM = 4  # hand position xyz + gripper opening (the first 4 entries of Meta-World's state)


class BackendError(TotoError):
    """The simulator or its offscreen renderer is not available."""


def require_backend():
    """Import the simulator; one clear line naming the extra / MUJOCO_GL when it is missing."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless default; a user's own setting wins
    try:
        import metaworld  # noqa: F401
        import mujoco
    except ImportError as e:
        raise BackendError(f"robot tasks need the simulator ({e.name} is not installed): "
                           f"pip install 'toto-video[robot]'") from None
    except (RuntimeError, AttributeError, OSError) as e:
        raise BackendError(f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                           f"({e}); use MUJOCO_GL=egl (needs Mesa's libEGL: apt install libegl1) or "
                           f"MUJOCO_GL=osmesa (apt install libosmesa6)") from None
    return mujoco


def valid_tasks() -> list[str]:
    """Meta-World v3 task names (without ``-v3``) that have a scripted expert."""
    require_backend()
    from metaworld.policies import ENV_POLICY_MAP

    return sorted(k[:-3] for k in ENV_POLICY_MAP if k.endswith("-v3"))


def resolve_task(name: str) -> str:
    """``drawer-open`` or ``drawer-open-v3`` -> ``drawer-open``; unknown names list the valid ones."""
    base = name[:-3] if name.endswith("-v3") else name
    tasks = valid_tasks()
    if base not in tasks:
        raise ConfigError(f"unknown task {name!r}; Meta-World v3 tasks (the '-v3' suffix is optional): "
                          f"{', '.join(tasks)}")
    return base


@dataclass
class Observation:
    frame: np.ndarray  # (R, R, 3) uint8
    proprio: np.ndarray  # (PROPRIO_DIM,) float32
    state: np.ndarray  # Meta-World's full state vector (the scripted expert's input, never the policy's)


class MetaWorldTask:
    """One Meta-World v3 task (goal observable, as its experts need) rendered at ``resolution``."""

    def __init__(self, task: str, resolution: int = RESOLUTION, camera: str = CAMERA, horizon: int = HORIZON):
        mujoco = require_backend()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        self.task, self.resolution, self.camera, self.horizon = resolve_task(task), resolution, camera, horizon
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task}-v3-goal-observable"](seed=0)
        self.expert = ENV_POLICY_MAP[f"{self.task}-v3"]()
        try:
            self.renderer = mujoco.Renderer(self.env.model, resolution, resolution)
        except Exception as e:  # noqa: BLE001 - any GL failure is the same user-facing problem
            raise BackendError(f"MuJoCo cannot render offscreen with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
                               f"({type(e).__name__}: {e}); use MUJOCO_GL=egl (needs Mesa's libEGL: apt "
                               f"install libegl1) or MUJOCO_GL=osmesa (apt install libosmesa6)") from None
        # shadows and reflections cost 6x the frame time of software GL for little visual content
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            self.renderer.scene.flags[flag] = 0
        self.steps = 0
        self._state = None

    def render(self) -> np.ndarray:
        self.renderer.update_scene(self.env.data, camera=self.camera)
        return np.ascontiguousarray(self.renderer.render()[::-1, ::-1])

    def _obs(self, state: np.ndarray) -> Observation:
        self._state = state
        return Observation(self.render(), state[:PROPRIO_DIM].astype(np.float32), state)

    def reset(self, seed: int) -> Observation:
        env = self.env
        env._freeze_rand_vec, env.seeded_rand_vec = False, True  # noqa: SLF001 - Meta-World's seeding switch
        env.seed(int(seed))
        state, _ = env.reset()
        env._freeze_rand_vec = True  # noqa: SLF001
        self.steps = 0
        return self._obs(state)

    def expert_action(self) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experts warn that their gains exceed the action box
            return np.clip(self.expert.get_action(self._state), -1, 1).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[Observation, bool, bool]:
        """-> (observation, success, done); done at success or after ``horizon`` steps."""
        state, reward, _, _, info = self.env.step(np.clip(np.asarray(action, dtype=np.float32), -1, 1))
        self.steps += 1
        self.reward = float(reward)  # Meta-World's dense reward (PPO's; behaviour cloning ignores it)
        success = bool(info["success"])
        return self._obs(state), success, success or self.steps >= self.horizon

    @property
    def action_dim(self) -> int:
        return int(self.env.action_space.shape[0])

    def close(self) -> None:
        try:
            self.renderer.close()
        except Exception:  # noqa: BLE001 - EGL teardown at interpreter exit may fail harmlessly
            pass
