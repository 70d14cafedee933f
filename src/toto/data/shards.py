"""Token shards: fixed-length uint16 sequences in flat memory-mapped files plus a JSON index.

    <dir>/index.json        layout, geometry, tokenizer identity, shard list, counts
    <dir>/shard_00000.bin   n_sequences * seq_len tokens, little-endian uint16, no header

Each shard file is written under a temporary name and renamed when complete, and the index
is rewritten atomically after every shard, so a killed writer leaves a valid (shorter) set
that ``ShardWriter(..., resume=True)`` continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import DataError
from ..ioutil import atomic_write_bytes, atomic_write_json
from ..vocab import VocabLayout, sequence_length, token_dtype

FORMAT = "toto-shards"
VERSION = 1
INDEX = "index.json"


@dataclass(frozen=True)
class ShardGeometry:
    """What one sequence holds: ``frames_per_sequence`` frames of ``grid`` codes each."""

    grid: tuple[int, int]  # (h, w) codes per frame, e.g. (16, 16) for 128px dVAE
    frames_per_sequence: int

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return sequence_length(self.frames_per_sequence, self.tokens_per_frame)


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.bin"


def read_index(path: str | Path) -> dict:
    path = Path(path)
    f = path / INDEX if path.is_dir() or not path.suffix else path
    if not f.is_file():
        raise DataError(f"no token shards at {path}: {f.name} not found")
    try:
        idx = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: index is not valid JSON ({e})") from None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        raise DataError(f"{f}: not a toto token-shard index (format field missing or wrong)")
    if idx.get("version") != VERSION:
        raise DataError(f"{f}: shard format version {idx.get('version')} not supported (expected {VERSION})")
    for key in ("vocab", "grid", "frames_per_sequence", "seq_len", "shards", "n_sequences"):
        if key not in idx:
            raise DataError(f"{f}: index lacks the field {key!r}")
    return idx


class ShardWriter:
    """Append sequences; each full shard is written atomically and recorded in the index."""

    def __init__(self, out_dir: str | Path, layout: VocabLayout, geometry: ShardGeometry,
                 tokenizer: dict, sequences_per_shard: int = 4096, resume: bool = False,
                 overwrite: bool = False):
        self.dir = Path(out_dir)
        self.layout, self.geometry = layout, geometry
        self.dtype = token_dtype(layout.vocab_size)
        self.sequences_per_shard = sequences_per_shard
        self.buffer: list[np.ndarray] = []
        index_file = self.dir / INDEX
        if index_file.exists() and resume:
            self.index = read_index(self.dir)
            self._check_resume(tokenizer)
        elif index_file.exists() and not overwrite:
            raise DataError(f"{self.dir} already holds token shards; pass resume or overwrite")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            for old in self.dir.glob("shard_*.bin*"):
                old.unlink()
            self.index = {
                "format": FORMAT, "version": VERSION, "dtype": self.dtype.name,
                "vocab": layout.to_dict(), "grid": list(geometry.grid),
                "tokens_per_frame": geometry.tokens_per_frame,
                "frames_per_sequence": geometry.frames_per_sequence, "seq_len": geometry.seq_len,
                "tokenizer": tokenizer, "shards": [], "n_sequences": 0, "n_tokens": 0,
                "complete": False, "meta": {},
            }
            self._write_index()

    def _check_resume(self, tokenizer: dict) -> None:
        from ..tokenizers.base import check_identity

        idx = self.index
        mine = {"vocab": self.layout.to_dict(), "grid": list(self.geometry.grid),
                "frames_per_sequence": self.geometry.frames_per_sequence}
        for k, v in mine.items():
            if idx.get(k) != v:
                raise DataError(f"cannot resume {self.dir}: its {k} is {idx.get(k)!r}, this run has {v!r}")
        check_identity(idx.get("tokenizer"), tokenizer, f"cannot resume: {self.dir}", DataError)  # the one check

    @property
    def meta(self) -> dict:
        """Free-form state saved with every index write (e.g. which inputs are done)."""
        return self.index["meta"]

    @property
    def n_sequences(self) -> int:
        return self.index["n_sequences"] + len(self.buffer)

    def add(self, seq: np.ndarray) -> None:
        seq = np.asarray(seq)
        if seq.shape != (self.geometry.seq_len,):
            raise ValueError(f"sequence must have shape ({self.geometry.seq_len},), got {seq.shape}")
        if seq.min() < 0 or seq.max() >= self.layout.vocab_size:
            raise ValueError(f"sequence has ids outside [0, {self.layout.vocab_size})")
        self.buffer.append(seq.astype(self.dtype))
        if len(self.buffer) >= self.sequences_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write buffered sequences as a new shard (if any) and rewrite the index with ``meta``."""
        if self.buffer:
            arr = np.stack(self.buffer).astype(self.dtype.newbyteorder("<"))
            name = _shard_name(len(self.index["shards"]))
            atomic_write_bytes(self.dir / name, arr.tobytes())
            self.index["shards"].append({"file": name, "n_sequences": len(arr), "max_token": int(arr.max())})
            self.index["n_sequences"] += len(arr)
            self.index["n_tokens"] = self.index["n_sequences"] * self.geometry.seq_len
            self.buffer = []
        self._write_index()

    def close(self) -> dict:
        self.flush()
        self.index["complete"] = True
        self._write_index()
        return self.index

    def _write_index(self) -> None:
        atomic_write_json(self.dir / INDEX, self.index)


class ShardDataset:
    """Read-only view over a shard folder: ``ds[i] -> (seq_len,) uint16``; validated on open."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.index = idx = read_index(self.dir)
        self.layout = VocabLayout.from_dict(idx["vocab"])
        if idx["vocab"].get("vocab_size") != self.layout.vocab_size:
            raise DataError(f"{self.dir / INDEX}: vocab_size {idx['vocab'].get('vocab_size')} does not "
                            f"match n_special + n_codes = {self.layout.vocab_size}")
        self.geometry = ShardGeometry(tuple(idx["grid"]), idx["frames_per_sequence"])
        self.seq_len = idx["seq_len"]
        if self.seq_len != self.geometry.seq_len:
            raise DataError(f"{self.dir / INDEX}: seq_len {self.seq_len} does not match 2 + frames x grid "
                            f"= {self.geometry.seq_len}")
        self.dtype = np.dtype(idx.get("dtype", "uint16")).newbyteorder("<")
        self._maps, counts = [], []
        for s in idx["shards"]:
            f = self.dir / s["file"]
            if not f.is_file():
                raise DataError(f"shard file missing: {f}")
            expected = s["n_sequences"] * self.seq_len * self.dtype.itemsize
            if f.stat().st_size != expected:
                raise DataError(f"shard {f} is {f.stat().st_size} bytes, the index expects {expected} "
                                f"({s['n_sequences']} sequences of {self.seq_len}); truncated or foreign file")
            if s.get("max_token", 0) >= self.layout.vocab_size:
                raise DataError(f"shard {f} holds token id {s['max_token']} beyond vocabulary {self.layout.vocab_size}")
            if s["n_sequences"]:
                self._maps.append(np.memmap(f, dtype=self.dtype, mode="r").reshape(s["n_sequences"], self.seq_len))
            counts.append(s["n_sequences"])
        if sum(counts) != idx["n_sequences"]:
            raise DataError(f"{self.dir / INDEX}: n_sequences {idx['n_sequences']} but shards hold {sum(counts)}")
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._maps[s][i - self._starts[s]]

    def batch(self, indices) -> np.ndarray:
        return np.stack([self[int(i)] for i in indices])

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse a model whose vocabulary or context does not fit this data."""
        if cfg.vocab_size != self.layout.vocab_size:
            raise DataError(f"{self.dir} was built for a vocabulary of {self.layout.vocab_size} ids "
                            f"({self.layout.n_codes} codes + {self.layout.n_special} specials); the model "
                            f"has vocab_size={cfg.vocab_size}")
        if cfg.max_seq_len < self.seq_len:
            raise DataError(f"{self.dir} holds sequences of {self.seq_len} tokens; the model context "
                            f"max_seq_len={cfg.max_seq_len} is shorter")
