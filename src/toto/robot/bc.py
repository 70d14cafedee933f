"""Behaviour cloning on demonstrations: features cached once per demo set, exact resume per epoch.

Run folder of one policy (``OUT/<name>/``):

    train_state.pt     after every epoch: head/CNN weights, optimizer, epoch, losses, identity
    policy/            the finished policy (see toto.robot.policy)
    train.json         what was trained on and the loss curve

Feature cache (toto.eval.cache, ``CACHE/<key>/``, key = encoder identity x demo-set fingerprint):
the frozen encoder runs once over every demo window; every later run with the same encoder and
demos (another head, another seed) reads it, its checksum checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import option
from ..errors import ConfigError, DataError
from ..ioutil import atomic_write_json
from ..jobstate import load_state, refuse_changed, save_state
from .demos import Episode, fingerprint
from .policy import Policy, PolicySpec, TotoEncoder, window_index


@dataclass
class BCConfig:
    epochs: int = option(60, "")
    batch_size: int = option(256, "")
    lr: float = option(1e-3, "")
    seed: int = option(0, "policy initialisation and batch order")

    def validate(self) -> "BCConfig":
        for k in ("epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        return self


def encoder_identity(spec: PolicySpec) -> dict:
    from ..eval.features import file_identity
    from ..train.checkpoint import resolve_checkpoint

    if spec.encoder == "cnn":
        return {"encoder": "cnn", "context": spec.context}
    return {"encoder": spec.encoder, "layers": spec.layers, "context": spec.context,
            "checkpoint": file_identity(resolve_checkpoint(spec.checkpoint) / "model.safetensors"),
            "tokenizer": file_identity(spec.tokenizer)}


def cached_features(encoder: TotoEncoder, frames: np.ndarray, idx: np.ndarray, cache_dir: Path, identity: dict,
                    batch: int = 64, progress: bool = True) -> torch.Tensor:
    """``(N, dim)`` features of every window ``frames[idx[i]]``, read from or written to the
    cache of ``identity`` (toto.eval.cache: one chunk, its checksum checked when read)."""
    from ..eval.cache import ChunkCache

    cache = ChunkCache(cache_dir, {**identity, "version": 2}, ["windows"])
    if not cache.todo("windows", 1):
        return torch.from_numpy(cache.concat("windows", "features", np.zeros((0, encoder.dim), np.float32)))
    out = []
    for s in tqdm(range(0, len(idx), batch), desc="features", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        out.append(encoder(frames[idx[s:s + batch]]))
    feats = torch.cat(out).contiguous()
    cache.put("windows", 0, {"features": feats.numpy()}, len(feats))
    cache.finish()
    return feats


def train_policy(episodes: list[Episode], spec: PolicySpec, out: str | Path, cfg: BCConfig,
                 cache_dir: str | Path, encoder: TotoEncoder | None = None, progress: bool = True) -> dict:
    """Train one BC policy in ``out``; a killed run resumes from its last finished epoch and ends
    with the same weights as an uninterrupted one."""
    cfg = cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not episodes:
        raise DataError("no demonstration episodes to train on")
    dims = {(e.proprio.shape[1], e.actions.shape[1]) for e in episodes}
    if len(dims) != 1:
        raise DataError(f"episodes disagree on (proprio, action) sizes: {sorted(dims)}")
    frames = np.concatenate([e.frames for e in episodes])
    proprio = torch.from_numpy(np.concatenate([e.proprio for e in episodes]).astype(np.float32))
    actions = torch.from_numpy(np.concatenate([e.actions for e in episodes]).astype(np.float32))
    idx = window_index([len(e.actions) for e in episodes], spec.context)
    demos_key = fingerprint(episodes)
    ident = {"spec": spec.to_dict(), "encoder": encoder_identity(spec), "demos": demos_key,
             "bc": cfg.__dict__}

    feats = None
    if spec.encoder != "cnn":
        feats = cached_features(encoder, frames, idx, Path(cache_dir),
                                {"encoder": encoder_identity(spec), "demos": demos_key}, progress=progress)

    torch.manual_seed(cfg.seed)
    policy = Policy(spec, encoder)
    policy.head.set_stats(feats, proprio)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    state_file = out / "train_state.pt"
    epoch, losses = 0, []
    if state_file.is_file():
        st = load_state(state_file)
        refuse_changed(st["identity"], ident, f"{out} (delete {state_file.name} to start it over)")
        policy.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        epoch, losses = st["epoch"], st["losses"]

    n = len(idx)
    bar = tqdm(total=cfg.epochs, initial=epoch, desc=f"train {out.name}", unit="epoch",
               disable=not progress or epoch >= cfg.epochs, dynamic_ncols=True)
    policy.train()
    try:
        while epoch < cfg.epochs:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            total = 0.0
            for s in range(0, n, cfg.batch_size):
                b = perm[s:s + cfg.batch_size]
                x = feats[b] if feats is not None else policy.features(torch.from_numpy(frames[idx[b.numpy()]]))
                loss = F.mse_loss(policy(x, proprio[b]), actions[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            epoch += 1
            losses.append(total / n)
            save_state(state_file, {"identity": ident, "model": policy.state_dict(), "optim": opt.state_dict(),
                                     "epoch": epoch, "losses": losses})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    policy.eval()
    policy.save(out / "policy")
    report = {"spec": spec.to_dict(), "bc": cfg.__dict__, "samples": n, "episodes": len(episodes),
              "demos": demos_key, "losses": losses, "final_loss": losses[-1] if losses else None}
    atomic_write_json(out / "train.json", report)
    return report
