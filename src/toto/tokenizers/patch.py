"""Patch k-means tokenizer: the cheap baseline of SPEC section 2 (no learned semantics).

Each ``p x p`` RGB patch (default 8x8, like the dVAE's downsampling) is replaced by the index
of its nearest centroid (squared L2 in pixel units) in a codebook fitted with k-means on the
data; decoding pastes the centroids back. The codebook lives in one safetensors file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .base import CONFIG_KEY, Tokenizer, read_metadata, register


def to_patches(frames: np.ndarray | torch.Tensor, p: int) -> torch.Tensor:
    """``frames: (N, H, W, 3)`` -> ``patches: (N, H/p, W/p, p*p*3) float32`` (row-major)."""
    x = torch.as_tensor(frames)
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // p, w // p, p * p * c).float()


def from_patches(patches: torch.Tensor, p: int) -> torch.Tensor:
    """``patches: (N, h, w, p*p*3)`` -> ``frames: (N, h*p, w*p, 3)`` (inverse of to_patches)."""
    n, h, w, _ = patches.shape
    x = patches.reshape(n, h, w, p, p, 3).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h * p, w * p, 3)


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched assignment: ``x: (M, D)``, ``centroids: (K, D)`` -> (index (M,) int64, sq. dist (M,)).

    ``|x|^2 - 2 x.c + |c|^2`` in row chunks so memory stays ~16M floats; ties go to the lower
    index (torch.min returns the first minimum).
    """
    k = centroids.shape[0]
    chunk = chunk or max(1, (1 << 24) // max(k, 1))
    c2 = (centroids * centroids).sum(1)
    idx, dist = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        d = c2[None, :] - 2.0 * (xb @ centroids.T)  # (m, K); |x|^2 added after the argmin
        m, i = d.min(1)
        idx.append(i)
        dist.append((m + (xb * xb).sum(1)).clamp_min_(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, tol: float = 1e-6) -> tuple[torch.Tensor, dict]:
    """Lloyd's k-means with k-means++ seeding; deterministic given ``seed``.

    ``x: (M, D) float32`` -> ``centroids: (K, D)`` and stats (inertia per iteration, iterations
    run, empty clusters re-seeded). An empty cluster is re-seeded with the point currently
    farthest from its centroid.
    """
    m = x.shape[0]
    if m < k:
        raise DataError(f"k-means needs at least n_codes={k} patches, got {m}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    # k-means++: each new centre is drawn with probability proportional to D(x)^2
    x2 = (x * x).sum(1)  # |x|^2 - 2 x.c + |c|^2: one mat-vec per new centre, no (M, D) temporaries

    def dist_to(j: int) -> torch.Tensor:
        return (x2 - 2.0 * (x @ x[j]) + x2[j]).clamp_min_(0)

    first = int(torch.randint(m, (1,), generator=g))
    chosen = [first]
    d2 = dist_to(first)
    for _ in range(1, k):
        cum = torch.cumsum(d2.double(), 0)
        total = float(cum[-1])
        if total > 0:  # inverse-CDF draw of an index with probability d2 / total
            u = float(torch.rand(1, generator=g, dtype=torch.float64)) * total
            j = min(int(torch.searchsorted(cum.cpu(), torch.tensor([u], dtype=torch.float64), right=True)), m - 1)
        else:  # fewer distinct patches than codes: duplicates are unavoidable
            j = int(torch.randint(m, (1,), generator=g))
        chosen.append(j)
        d2 = torch.minimum(d2, dist_to(j))
    c = x[torch.tensor(chosen, device=x.device)].clone()
    history, reseeded, it = [], 0, 0
    for it in range(1, iters + 1):
        idx, dist = nearest(x, c)
        history.append(float(dist.sum()) / m)
        counts = torch.bincount(idx, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = torch.argsort(dist, descending=True, stable=True)[:len(empty)]
            new[empty] = x[far]
            reseeded += len(empty)
        shift = float(((new - c) ** 2).sum(1).max())
        c = new
        if shift <= tol and not len(empty):
            break
    _, dist = nearest(x, c)
    history.append(float(dist.sum()) / m)
    return c, {"inertia": history, "iterations": it, "reseeded": reseeded}


@register
class PatchTokenizer(Tokenizer):
    kind = "patch"

    def __init__(self, codebook: np.ndarray | torch.Tensor, patch: int = 8, resolution: int = 128,
                 device: str = "cpu"):
        cb = codebook if torch.is_tensor(codebook) else torch.from_numpy(np.asarray(codebook, dtype=np.float32))
        if cb.ndim != 2 or cb.shape[1] != patch * patch * 3:
            raise DataError(f"patch codebook must be (K, {patch * patch * 3}), got {tuple(cb.shape)}")
        if resolution % patch:
            raise DataError(f"resolution {resolution} is not a multiple of the patch size {patch}")
        self.device = torch.device(device)
        self.codebook = cb.float().to(self.device)  # (K, p*p*3) pixel values in [0, 255]
        self.n_codes = int(cb.shape[0])
        self.downsample = patch
        self.resolution = resolution
        self.fit_stats: dict = {}

    @classmethod
    def fit(cls, frames: np.ndarray, n_codes: int = 1024, patch: int = 8, resolution: int | None = None,
            seed: int = 0, iters: int = 20, max_patches: int | None = 200_000,
            device: str = "cpu") -> "PatchTokenizer":
        """Fit the codebook on ``frames: (N, R, R, 3) uint8`` (a seeded subset of at most
        ``max_patches`` patches is used)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise DataError(f"fit frames: expected (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        resolution = resolution or frames.shape[1]
        if resolution % patch:
            raise DataError(f"resolution {resolution} is not a multiple of the patch size {patch}")
        if frames.shape[1:3] != (resolution, resolution):
            raise DataError(f"fit frames are {frames.shape[1]}x{frames.shape[2]}, expected {resolution}x{resolution}")
        x = to_patches(frames, patch).reshape(-1, patch * patch * 3)
        if max_patches is not None and x.shape[0] > max_patches:
            g = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=g)[:max_patches]]
        c, stats = kmeans(x.to(device), n_codes, iters=iters, seed=seed)
        tok = cls(c.cpu(), patch=patch, resolution=resolution, device=device)
        tok.fit_stats = {**stats, "n_patches": int(x.shape[0]), "n_frames": int(frames.shape[0])}
        return tok

    def encode(self, frames: np.ndarray) -> np.ndarray:
        frames = self.check_frames(frames)
        p = self.downsample
        x = to_patches(torch.from_numpy(np.ascontiguousarray(frames)).to(self.device), p)  # (N, h, w, D)
        n, h, w, d = x.shape
        idx, _ = nearest(x.reshape(-1, d), self.codebook)
        return idx.reshape(n, h, w).cpu().numpy().astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=self.device)
        if codes.ndim != 3:
            raise DataError(f"codes must be (N, h, w), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise DataError(f"codes must lie in [0, {self.n_codes})")
        patches = self.codebook[codes]  # (N, h, w, p*p*3)
        return from_patches(patches, self.downsample).round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    def config(self) -> dict:
        return {"n_codes": self.n_codes, "patch": self.downsample, "resolution": self.resolution}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codebook": self.codebook.detach().float().cpu().contiguous()}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        if self.fit_stats:
            meta["toto_patch_fit"] = json.dumps(self.fit_stats)
        return meta

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "PatchTokenizer":
        from safetensors.torch import load_file

        meta = read_metadata(path)
        try:
            cfg = json.loads(meta[CONFIG_KEY])
            cb = load_file(str(path))["codebook"]
            tok = cls(cb, patch=int(cfg["patch"]), resolution=int(cfg["resolution"]), device=device)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path}: not a valid patch tokenizer file ({type(e).__name__}: {e})") from None
        if tok.n_codes != int(cfg["n_codes"]):
            raise DataError(f"{path}: codebook has {tok.n_codes} rows, metadata says n_codes={cfg['n_codes']}")
        if "toto_patch_fit" in meta:
            tok.fit_stats = json.loads(meta["toto_patch_fit"])
        return tok
