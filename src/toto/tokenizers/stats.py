"""Codebook coverage of any tokenizer on given frames (``toto tokenizer stats``).

The paper (arXiv 2501.05453, section 3.1) prefers the dVAE partly because it uses nearly all of
its 8k codes while a VQGAN uses less than half of its codebook. This measures that for any
tokenizer file: the fraction of codes used, the perplexity of the code histogram (exp of its
entropy: the number of equally used codes with the same entropy), and the reconstruction PSNR.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .base import Tokenizer

PAPER_REFERENCE = "paper (arXiv 2501.05453, sec. 3.1): the dVAE uses ~100% of its 8192 codes, a VQGAN < 50% of its codebook"


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, per_frame: bool = False) -> float:
    """Peak signal-to-noise ratio in dB of ``b`` against ``a`` (same shape), from the mean squared
    error over all pixels and channels; inf when identical. ``per_frame``: ``a, b`` are stacks
    ``(N, ...)`` of frames and the result is the mean of each frame's PSNR (how a tokenizer's
    reconstructions are scored), each frame's error floored at 1e-10 so that one exact frame
    does not make the mean infinite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    if per_frame:
        mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
        return float(np.mean([mse_to_psnr(m, data_range) for m in np.maximum(mse, 1e-10)]))
    return mse_to_psnr(float(np.mean((a - b) ** 2)), data_range)


def mse_to_psnr(mse: float, data_range: float = 255.0) -> float:
    """``10 log10(data_range^2 / mse)`` dB; inf for a zero error."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def usage_from_counts(counts: np.ndarray) -> dict:
    """Codes used (count and fraction of the codebook) and the perplexity ``exp(-sum p log p)`` of
    the code histogram ``counts: (n_codes,)``."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return {"used": int((counts > 0).sum()), "usage": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def codebook_usage(codes: np.ndarray, n_codes: int) -> dict:
    """``usage_from_counts`` of an array of codes."""
    return usage_from_counts(np.bincount(np.asarray(codes).ravel(), minlength=n_codes))


def code_stats(tok: Tokenizer, frames: np.ndarray, chunk: int = 32, progress: bool = False) -> tuple[dict, np.ndarray]:
    """Encode and decode ``frames: (N, H, W, 3) uint8`` in chunks -> (summary, counts per code).

    ``usage`` is bounded by ``positions / n_codes`` (reported as ``usage_bound``): a small sample
    cannot show a large codebook used in full.
    """
    counts = np.zeros(tok.n_codes, np.int64)
    psnr_sum = 0.0
    for i in tqdm(range(0, len(frames), chunk), desc="stats", unit="chunk", disable=not progress, leave=False):
        f = frames[i:i + chunk]
        codes = tok.encode(f)
        counts += np.bincount(codes.ravel(), minlength=tok.n_codes)
        psnr_sum += psnr(f, tok.decode(codes), per_frame=True) * len(f)
    positions = int(counts.sum())
    use = usage_from_counts(counts)
    return {"kind": tok.kind, "n_codes": tok.n_codes, "frames": len(frames), "resolution": int(frames.shape[1]),
            "grid": [int(frames.shape[1]) // tok.downsample, int(frames.shape[2]) // tok.downsample],
            "positions": positions, **use, "usage_bound": min(1.0, positions / tok.n_codes),
            "psnr": psnr_sum / max(len(frames), 1), "reference": PAPER_REFERENCE}, counts


def plot_code_frequencies(counts: np.ndarray, path: str | Path, title: str) -> None:
    """Code frequencies sorted from most to least used, log scale (a flat line is full use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..ioutil import save_figure

    freq = np.sort(counts)[::-1] / max(int(counts.sum()), 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(freq) + 1), np.where(freq > 0, freq, np.nan), lw=1)
    ax.axhline(1 / len(freq), color="gray", ls="--", lw=1, label="uniform use")
    used = int((counts > 0).sum())
    ax.axvline(used, color="tab:red", ls=":", lw=1, label=f"{used} of {len(freq)} codes used")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("frequency")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
