"""PPO (stable-baselines3) on frozen Toto features: the paper's simulation protocol (RL with a
frozen visual encoder, after MVP), on a Meta-World task.

The gymnasium env gives the last ``context`` frames and the proprioception; ``TotoExtractor``
(an SB3 ``BaseFeaturesExtractor``) turns them into frozen Toto features + proprioception, and
SB3's PPO trains its actor-critic MLP on top. Toto's weights are not parameters of the extractor
(the optimizer never sees them) and are checked unchanged after learning.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch

from ..errors import TotoError
from .env import BackendError
from .policy import TotoEncoder


def require_sb3():
    try:
        import gymnasium  # noqa: F401
        import stable_baselines3
    except ImportError as e:
        raise BackendError(f"PPO needs stable-baselines3 ({e.name} is not installed): "
                           f"pip install 'toto-video[robot]'") from None
    return stable_baselines3


def make_gym_env(task: str, context: int, resolution: int = 128, horizon: int | None = None, seed: int = 0):
    """A gymnasium env over MetaWorldTask: observation ``{"frames": (k, R, R, 3) uint8,
    "proprio": (4,)}``, Meta-World's dense reward, terminated on success, truncated at the horizon.
    Episode i after construction uses scene seed ``seed + i``."""
    import gymnasium as gym

    from .env import HORIZON, PROPRIO_DIM, MetaWorldTask

    class FrameEnv(gym.Env):
        metadata = {"render_modes": []}

        def __init__(self):
            self.task = MetaWorldTask(task, resolution, horizon=horizon or HORIZON)
            self.observation_space = gym.spaces.Dict({
                "frames": gym.spaces.Box(0, 255, (context, resolution, resolution, 3), np.uint8),
                "proprio": gym.spaces.Box(-np.inf, np.inf, (PROPRIO_DIM,), np.float32)})
            self.action_space = gym.spaces.Box(-1.0, 1.0, (self.task.action_dim,), np.float32)
            self.next_seed = seed
            self.history = collections.deque(maxlen=context)

        def _obs(self, o):
            if not self.history:
                self.history.extend([o.frame] * context)
            else:
                self.history.append(o.frame)
            return {"frames": np.stack(self.history), "proprio": o.proprio}

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            if seed is not None:
                self.next_seed = seed
            self.history.clear()
            o = self.task.reset(self.next_seed)
            self.next_seed += 1
            return self._obs(o), {}

        def step(self, action):
            o, success, done = self.task.step(action)
            return self._obs(o), self.task.reward, success, done and not success, {"is_success": success}

        def close(self):
            self.task.close()

    return FrameEnv()


def toto_extractor_class():
    """The SB3 extractor class (built lazily: SB3 is an optional extra)."""
    require_sb3()
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class TotoExtractor(BaseFeaturesExtractor):
        """Frozen Toto features of the frames, concatenated with the proprioception."""

        def __init__(self, observation_space, encoder: TotoEncoder):
            super().__init__(observation_space, encoder.dim + observation_space["proprio"].shape[0])
            self.encoder = encoder

        def forward(self, obs: dict) -> torch.Tensor:
            frames = obs["frames"].round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            feats = self.encoder(frames).to(obs["proprio"].device)
            return torch.cat([feats, obs["proprio"].float()], 1)

    return TotoExtractor


def policy_kwargs(encoder: TotoEncoder) -> dict:
    """SB3 policy settings: the frozen-Toto extractor and a 256x256 actor-critic MLP."""
    return {"features_extractor_class": toto_extractor_class(),
            "features_extractor_kwargs": {"encoder": encoder}, "net_arch": [256, 256]}


def load_ppo(path: str | Path, encoder: TotoEncoder):
    """A saved PPO model (``OUT/ppo.zip``) with its frozen Toto re-attached."""
    require_sb3()
    from stable_baselines3 import PPO

    return PPO.load(str(path), custom_objects={"policy_kwargs": policy_kwargs(encoder)})


def train_ppo(task: str, checkpoint: str, tokenizer: str, layers: list[int], context: int, steps: int,
              out: str | Path, n_steps: int = 512, batch_size: int = 64, seed: int = 0,
              horizon: int | None = None, resolution: int = 128, device: str = "cpu", progress: bool = True) -> dict:
    """PPO for ``steps`` environment steps; saves the SB3 model and a JSON summary in ``out``."""
    from ..ioutil import atomic_file, atomic_write_json

    require_sb3()
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    enc = TotoEncoder.load(checkpoint, tokenizer, layers, context, device=device)
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    env = Monitor(make_gym_env(task, context, resolution, horizon, seed))
    model = PPO("MultiInputPolicy", env, n_steps=n_steps, batch_size=batch_size, seed=seed, device=device,
                policy_kwargs=policy_kwargs(enc),
                verbose=0)
    model.learn(total_timesteps=steps, progress_bar=False)
    changed = [k for k, v in enc.model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise TotoError(f"frozen Toto weights changed during PPO: {changed[:3]}")
    with atomic_file(out / "ppo.zip") as tmp:  # stable-baselines3 writes a zip in place
        model.save(str(tmp))
    ep_rewards = [float(r) for r in env.get_episode_rewards()]
    report = {"task": task, "checkpoint": str(checkpoint), "layers": layers, "context": context, "steps": steps,
              "n_steps": n_steps, "episodes": len(ep_rewards), "episode_rewards": ep_rewards,
              "episode_lengths": [int(n) for n in env.get_episode_lengths()], "toto_frozen": True}
    atomic_write_json(out / "ppo.json", report)
    env.close()
    return report
