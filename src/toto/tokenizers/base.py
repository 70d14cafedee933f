"""The tokenizer interface and the one registry that loads any tokenizer file.

A tokenizer turns frames ``(N, H, W, 3) uint8`` into codes ``(N, H/d, W/d) int64`` and back.
Every tokenizer is stored as one safetensors file whose metadata names its kind and config,
so ``get_tokenizer(path)`` can load any of them and shard indexes can record ``identity()``.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ..errors import DataError

KIND_KEY = "toto_tokenizer_kind"
CONFIG_KEY = "toto_tokenizer_config"


class Tokenizer(ABC):
    kind: str = ""  # registry key, stored in the file's metadata

    n_codes: int  # codebook size K (codes are 0..K-1)
    downsample: int  # pixels per code along each side (8 for the DALL-E dVAE)
    resolution: int  # square frame size in pixels this tokenizer is used at

    @property
    def grid(self) -> tuple[int, int]:
        return (self.resolution // self.downsample, self.resolution // self.downsample)

    @abstractmethod
    def encode(self, frames: np.ndarray) -> np.ndarray:
        """``frames: (N, H, W, 3) uint8`` -> ``codes: (N, H/d, W/d) int64``."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """``codes: (N, h, w)`` -> ``frames: (N, h*d, w*d, 3) uint8``."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-serialisable constructor arguments (saved in the file's metadata)."""

    def save(self, path: str | Path) -> None:
        """Write ``tensors()`` as one safetensors file with ``metadata()`` as its metadata, atomically."""
        from safetensors.torch import save

        from ..ioutil import atomic_write_bytes

        self._fingerprint = None
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(self.tensors(), metadata=self.metadata()))

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "Tokenizer":
        ...

    def metadata(self) -> dict[str, str]:
        return {KIND_KEY: self.kind, CONFIG_KEY: json.dumps(self.config())}

    @abstractmethod
    def tensors(self) -> dict:
        """Every weight by name, as CPU float32 tensors (what ``save`` writes and ``fingerprint`` hashes)."""

    def fingerprint(self) -> str:
        """Content hash of the weights (16 hex digits): two tokenizers of one shape but different
        codebooks or networks give different codes, so shapes alone cannot tell them apart.
        Cached; ``save`` clears the cache."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            for k, v in sorted(self.tensors().items()):
                h.update(k.encode())
                h.update(v.detach().float().contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def identity(self) -> dict:
        """What shard indexes, checkpoints and caches record to detect a tokenizer mismatch."""
        return {"kind": self.kind, "n_codes": self.n_codes, "downsample": self.downsample,
                "resolution": self.resolution, "config": self.config(), "weights_sha256": self.fingerprint()}

    def check_codes(self, codes: np.ndarray, where: str = "codes") -> np.ndarray:
        """``(N, h, w)`` integer codes in ``[0, n_codes)`` -> int64."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise DataError(f"{where}: expected (N, h, w) integer codes, got {codes.shape} {codes.dtype}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise DataError(f"{where}: codes must lie in [0, {self.n_codes}), got range "
                            f"[{codes.min()}, {codes.max()}]")
        return codes.astype(np.int64)

    def check_frames(self, frames: np.ndarray, where: str = "frames") -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DataError(f"{where}: expected (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        if frames.shape[1] % self.downsample or frames.shape[2] % self.downsample:
            raise DataError(f"{where}: frame size {frames.shape[1]}x{frames.shape[2]} is not a multiple "
                            f"of the tokenizer's downsampling factor {self.downsample}")
        return frames


IDENTITY_KEYS = ("kind", "n_codes", "downsample", "resolution", "weights_sha256")


def check_identity(recorded: dict | None, tokenizer: Tokenizer | dict, where: str,
                   error: type[Exception] = DataError, keys: tuple[str, ...] = IDENTITY_KEYS) -> None:
    """The one tokenizer check: refuse ``tokenizer`` (or its recorded identity) when ``recorded``
    (the identity saved with shards, a checkpoint or a cache) names another kind, size,
    resolution or weights. Keys either record lacks are not compared (older records)."""
    if not isinstance(recorded, dict):
        return
    mine = tokenizer if isinstance(tokenizer, dict) else tokenizer.identity()
    diff = [k for k in keys if k in recorded and k in mine and recorded[k] != mine[k]]
    if diff:
        desc = ", ".join(f"{k} {recorded[k]!r} there vs {mine[k]!r} here" for k in diff)
        raise error(f"{where} was made with a different tokenizer ({desc}); pass the tokenizer it was made with")


_REGISTRY: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    _REGISTRY[cls.kind] = cls
    return cls


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for a corrupt header
        raise DataError(f"{path}: not a safetensors tokenizer file ({e})") from None


def get_tokenizer(path: str | Path, device: str = "cpu") -> Tokenizer:
    """Load any tokenizer file written by ``Tokenizer.save``."""
    _import_builtin()
    meta = read_metadata(path)
    kind = meta.get(KIND_KEY)
    if kind not in _REGISTRY:
        raise DataError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind].load(path, device=device)


def _import_builtin() -> None:
    """Importing the modules registers their classes."""
    import importlib

    for mod in ("dvae", "patch", "vqgan"):
        try:
            importlib.import_module(f"toto.tokenizers.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"toto.tokenizers.{mod}":
                raise
