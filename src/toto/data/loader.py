"""Deterministic, resumable batches over token shards, split into train/val, sharded by rank.

The order is a pure function of (seed, epoch), so the loader's whole state is two integers
and a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .shards import ShardDataset


def split_indices(n: int, val_fraction: float, val_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split: ``round(n * val_fraction)`` sequences (at least 1 when asked, at
    most ``val_max``) go to validation; both index lists are sorted."""
    n_val = 0
    if val_fraction > 0:
        n_val = min(max(1, round(n * val_fraction)), val_max, n - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class TrainLoader:
    """Infinite shuffled batches ``(B, seq_len) int64`` for one data-parallel rank."""

    def __init__(self, ds: ShardDataset, indices: np.ndarray, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.ds, self.indices = ds, np.asarray(indices)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(self.indices) // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(f"{ds.dir}: {len(self.indices)} training sequences cannot fill one batch of "
                            f"{batch_size} x {world_size} rank(s); lower train.micro_batch_size or add data")
        self.epoch, self.position = 0, 0
        self._perm = None

    def _order(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.indices)
        return self._perm

    def next_batch(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        start = self.position * self.global_batch + self.rank * self.batch_size
        idx = self._order()[start:start + self.batch_size]
        self.position += 1
        return to_tensor(self.ds, idx)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position, also one saved with another world size or micro-batch: the
        sequences consumed so far in the epoch are the same, counted in this loader's batches."""
        consumed = int(state["position"]) * int(state["batch_size"]) * int(state["world_size"])
        if consumed % self.global_batch:
            raise DataError(f"cannot resume the data order: {consumed} sequences of this epoch were "
                            f"consumed in global batches of {state['batch_size']} x {state['world_size']}, "
                            f"not a multiple of this run's {self.batch_size} x {self.world_size}")
        self.epoch, self.position, self._perm = int(state["epoch"]), consumed // self.global_batch, None


def to_tensor(ds: ShardDataset, idx) -> torch.Tensor:
    batch = torch.from_numpy(ds.batch(idx).astype(np.int64))
    if batch.numel() and int(batch.max()) >= ds.layout.vocab_size:
        raise DataError(f"{ds.dir}: a sequence holds token id {int(batch.max())} beyond the vocabulary "
                        f"of {ds.layout.vocab_size}")
    return batch


def val_batches(ds: ShardDataset, indices: np.ndarray, batch_size: int, max_batches: int,
                rank: int = 0, world_size: int = 1):
    """The same fixed validation batches every time (this rank's share of them)."""
    mine = np.asarray(indices)[rank::world_size]
    for b in range(min(max_batches, -(-len(mine) // batch_size))):
        yield to_tensor(ds, mine[b * batch_size:(b + 1) * batch_size])
