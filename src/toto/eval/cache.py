"""The one on-disk cache for what an evaluation computes once and reads many times: token
sequences of a labelled dataset (``tokenize_splits``), a frozen model's per-layer features
(``FeatureExtractor``), a robot encoder's window features (``toto.robot.bc``).

A cache is a folder per identity (everything that changes its content: model, tokenizer,
dataset, settings; the folder name is a hash of it), filled in chunks so a killed job resumes
at its first unfinished chunk:

    <root>/<key>/manifest.json                 the identity; per part (split): finished chunks
                                               {file, n, sha256 per array, ...}, skipped files
    <root>/<key>/<part>_<chunk:05d>.safetensors  the chunk's arrays

Every array's SHA-256 is recorded when its chunk is written and checked each time it is read:
safetensors checks its header, not its bytes, and a garbled feature file once moved a probe's
accuracy from 83.3% to 66.7% without a word. A damaged file is an error (``DataError``, one line
naming the file; deleting it makes the next run recompute that chunk), never used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ioutil import atomic_file, atomic_write_json, read_json


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a)).hexdigest()


class ChunkCache:
    """The cache folder of ``identity`` under ``root`` with ``parts`` (e.g. the splits): resumed
    when the identity matches, started afresh otherwise (a changed input never reuses stale
    chunks); a finished chunk whose file is gone is computed again."""

    def __init__(self, root: str | Path, identity: dict, parts):
        identity = json.loads(json.dumps(identity))  # as the manifest stores it
        self.folder = Path(root) / cache_key(identity)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._mpath = self.folder / "manifest.json"
        m = read_json(self._mpath) if self._mpath.is_file() else None
        if not m or m.get("identity") != identity:
            m = {"identity": identity, "splits": {p: {"chunks": {}, "skipped": []} for p in parts}, "complete": False}
        self.manifest = m
        gone = [(part, c) for part in m["splits"].values() for c, rec in part["chunks"].items()
                if rec["n"] and not (self.folder / rec["file"]).is_file()]
        for part, c in gone:
            del part["chunks"][c]
        if gone:
            self._save()  # (a new cache's manifest is first written with its first chunk)

    def part(self, name: str) -> dict:
        """The manifest's record of one part: ``chunks`` done and ``skipped`` inputs (a list the
        job appends to; saved with the next chunk)."""
        return self.manifest["splits"][name]

    def todo(self, name: str, n_chunks: int) -> list[int]:
        return [c for c in range(n_chunks) if str(c) not in self.part(name)["chunks"]]

    def put(self, name: str, chunk: int, arrays: dict[str, np.ndarray], n: int, **record) -> None:
        """Write chunk ``chunk`` of part ``name`` (``n`` rows; no file when 0) atomically with
        its arrays' checksums, then mark it done."""
        from safetensors.numpy import save_file

        file = f"{name}_{chunk:05d}.safetensors"
        sums = {}
        if n:
            arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            with atomic_file(self.folder / file) as tmp:
                save_file(arrays, str(tmp))
            sums = {k: array_sha256(v) for k, v in arrays.items()}
        self.part(name)["chunks"][str(chunk)] = {"file": file, "n": n, "sha256": sums, **record}
        self._save()

    def records(self, name: str) -> list[dict]:
        """The part's finished chunks with rows, in chunk order."""
        chunks = self.part(name)["chunks"]
        return [chunks[c] for c in sorted(chunks, key=int) if chunks[c]["n"]]

    def read(self, record: dict, key: str) -> np.ndarray:
        """One array of a chunk, checked against the checksum recorded when it was written."""
        from safetensors import SafetensorError, safe_open

        path = self.folder / record["file"]
        try:
            with safe_open(str(path), framework="np") as f:
                a = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: corrupt or truncated cache file ({e}); delete it to recompute that "
                            f"chunk") from None
        if array_sha256(a) != record["sha256"].get(key):
            raise DataError(f"{path}: {key} does not match the checksum recorded when the cache was written "
                            f"(damaged since); delete it to recompute that chunk")
        return a

    def concat(self, name: str, key: str, empty: np.ndarray) -> np.ndarray:
        """``key`` of every chunk of a part, concatenated (``empty`` when it has no rows)."""
        parts = [self.read(r, key) for r in self.records(name)]
        return np.concatenate(parts) if parts else empty

    def finish(self) -> None:
        self.manifest["complete"] = True
        self._save()

    def _save(self) -> None:
        atomic_write_json(self._mpath, self.manifest)
