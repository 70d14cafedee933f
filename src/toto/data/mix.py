"""Training on a weighted mix of several token-shard folders (e.g. ImageNet + Kinetics, as in
the paper's joint image/video pre-training).

The sources are concatenated into one global index space (source ``s`` holds ids
``offsets[s] .. offsets[s+1]-1``), so the trainer, the loader state and the checkpoint see one
dataset. The weighted epoch order stays a pure function of (seed, epoch), which keeps resume
(also with another world size or micro-batch) exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .loader import TrainLoader, split_indices
from .shards import ShardDataset

MIX_TAG = 0x6D6978  # "mix": keeps the slot draw's RNG stream apart from the per-source ones


class MixedShards:
    """Several ShardDatasets as one: ``batch(global_idx) -> (B, seq_len)``; same interface as
    ShardDataset for the trainer (layout, seq_len, geometry, index, check_model, dir)."""

    def __init__(self, sources: list[ShardDataset]):
        first = sources[0]
        for other in sources[1:]:
            for what, a, b in (("vocabulary layout", first.index["vocab"], other.index["vocab"]),
                               ("seq_len", first.seq_len, other.seq_len),
                               ("grid", list(first.geometry.grid), list(other.geometry.grid)),
                               ("frames_per_sequence", first.geometry.frames_per_sequence,
                                other.geometry.frames_per_sequence),
                               ("tokenizer", first.index.get("tokenizer"), other.index.get("tokenizer"))):
                if a != b:
                    raise DataError(f"data.path: cannot mix {first.dir} and {other.dir}: their {what} "
                                    f"differ ({a!r} vs {b!r}); every folder must come from the same "
                                    f"tokenizer and sequence geometry")
        self.sources = sources
        self.layout, self.seq_len, self.geometry = first.layout, first.seq_len, first.geometry
        self.index = first.index  # tokenizer identity, vocab, geometry: shared by all sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.dir = " + ".join(str(s.dir) for s in sources)  # only used to name the data in errors
        self.names = source_names([s.dir for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.sources[s][int(i - self.offsets[s])]

    def batch(self, indices) -> np.ndarray:
        return np.stack([self[int(i)] for i in indices])

    def check_model(self, cfg) -> None:
        self.sources[0].check_model(cfg)  # all sources share layout and seq_len


def source_names(dirs: list[Path]) -> list[str]:
    """Folder names for per-source metrics; a repeated name gets its position appended."""
    names = [Path(d).name or str(d) for d in dirs]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def open_shards(paths: list[str], allow_incomplete: bool = False) -> ShardDataset | MixedShards:
    """One folder: the plain ShardDataset (today's behaviour); several: their mix. A folder whose
    ``toto tokenize`` was interrupted (``complete: false``) is refused unless ``allow_incomplete``:
    training on part of a corpus without noticing is a silent mistake."""
    sources = []
    for i, p in enumerate(paths):
        where = "data.path" if len(paths) == 1 else f"data.path[{i}]"
        try:
            ds = ShardDataset(p)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if not ds.index.get("complete", True) and not allow_incomplete:
            raise DataError(f"{where}: {p} is unfinished (its toto tokenize was interrupted: complete=false "
                            f"in its index); finish it with `toto tokenize --resume` or pass --allow-incomplete")
        sources.append(ds)
    return sources[0] if len(sources) == 1 else MixedShards(sources)


def source_ranges(ds) -> list[tuple[int, int]]:
    """``[(start, stop)]`` global ids of each source (one range for a plain folder)."""
    offsets = getattr(ds, "offsets", [0, len(ds)])
    return [(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]


def split_sources(ds, val_fraction: float, val_max: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out split per source (same fraction and cap each), in global ids, so every source
    is evaluated; for one folder exactly ``split_indices`` over it."""
    out = []
    for a, b in source_ranges(ds):
        tr, va = split_indices(b - a, val_fraction, val_max, seed)
        out.append((tr + a, va + a))
    return out


def mix_weights(weights: list[float] | None, train_counts: list[int]) -> np.ndarray:
    """Normalised source probabilities; default: proportional to each source's train sequences."""
    w = np.asarray(train_counts if weights is None else weights, dtype=np.float64)
    return w / w.sum()


def mixed_order(sources: list[np.ndarray], weights: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One epoch: N = total train sequences slots; each slot's source drawn i.i.d. with
    ``weights``; the k-th draw of source s takes element k of s's own permutations (seeded by
    (seed, epoch, s, cycle)), cycling to a fresh permutation when a heavily weighted source runs out."""
    n = sum(len(s) for s in sources)
    choice = np.random.default_rng([seed, epoch, MIX_TAG]).choice(len(sources), size=n, p=weights)
    order = np.empty(n, dtype=np.int64)
    for s, idx in enumerate(sources):
        mask = choice == s
        need = int(mask.sum())
        if need == 0:
            continue
        if len(idx) == 0:
            raise DataError(f"source {s} of the mix has no training sequences but weight {weights[s]:.3g}")
        cycles = -(-need // len(idx))
        perms = [np.random.default_rng([seed, epoch, MIX_TAG, s, c]).permutation(idx) for c in range(cycles)]
        order[mask] = np.concatenate(perms)[:need]
    return order


class MixedLoader(TrainLoader):
    """TrainLoader whose epoch order is ``mixed_order``: same state, same resume rules."""

    def __init__(self, ds: MixedShards, sources: list[np.ndarray], weights: np.ndarray, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(ds, np.concatenate(sources), batch_size, seed, rank, world_size)
        self.sources, self.weights = [np.asarray(s) for s in sources], np.asarray(weights)

    def _order(self) -> np.ndarray:
        if self._perm is None:
            self._perm = mixed_order(self.sources, self.weights, self.seed, self.epoch)
        return self._perm


def make_loader(ds, train_per_source: list[np.ndarray], weights: np.ndarray, batch_size: int, seed: int,
                rank: int = 0, world_size: int = 1) -> TrainLoader:
    if len(train_per_source) == 1:  # one folder: exactly today's order
        return TrainLoader(ds, train_per_source[0], batch_size, seed, rank, world_size)
    return MixedLoader(ds, train_per_source, weights, batch_size, seed, rank, world_size)


def describe_sources(ds, train_per_source: list[np.ndarray], weights: np.ndarray) -> list[dict]:
    """What the run trains on, for the checkpoint state and summary.json (and resume checks)."""
    dirs = [s.dir for s in ds.sources] if isinstance(ds, MixedShards) else [ds.dir]
    names = source_names(dirs)
    return [{"path": str(d), "name": n, "n_sequences": b - a, "n_train": len(t), "weight": float(w)}
            for d, n, (a, b), t, w in zip(dirs, names, source_ranges(ds), train_per_source, weights)]
