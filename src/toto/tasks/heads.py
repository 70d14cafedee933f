"""The probe heads: attentive pooling (the paper's probe, arXiv 2501.05453 Sec. 4) and average
pooling, on one layer's token features.

Both heads see one layer's token features ``(B, T, D)`` and share everything after pooling:

    tokens -> LayerNorm (no affine, per token) -> pool -> BatchNorm (no affine) -> Linear

- The per-token LayerNorm evens out the residual stream's scale, which grows with depth and
  differs by orders of magnitude between layers; without it one learning rate cannot suit
  every layer.
- The pooled vector is normalised by BatchNorm without affine parameters (as in MAE's linear
  probe): the classifier sees standardised features whatever the layer. ``norm="layernorm"``
  swaps in a LayerNorm without affine parameters.
- Attentive pooling: one learned query token cross-attends to the tokens with learned key and
  value projections, multi-head, ``softmax(q k^T / sqrt(d_head)) v`` per head, heads
  concatenated. Average pooling: the mean over tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .base import GlobalBatchNorm1d

POOLINGS = ("attentive", "average")


class AttentivePool(nn.Module):
    """``x: (B, T, D)`` -> ``(B, D)``: a learned query attends over the tokens, per head."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ConfigError(f"attentive probe: feature width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        k = self.k(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v(x).view(B, T, H, Dh).transpose(1, 2)
        q = self.query.view(1, H, 1, Dh).expand(B, H, 1, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        return y.reshape(B, D)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T)``: where each head looks (for inspection and plots)."""
        B, T, D = x.shape
        k = self.k(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.query.view(1, self.n_heads, 1, self.head_dim)
        return torch.softmax((q * k).sum(-1) / math.sqrt(self.head_dim), dim=-1)


class AveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class Probe(nn.Module):
    """Token features ``(B, T, D)`` -> class logits ``(B, n_classes)``."""

    def __init__(self, dim: int, n_classes: int, pooling: str, heads: int, norm: str = "batchnorm"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.token_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.pool = AttentivePool(dim, heads) if pooling == "attentive" else AveragePool()
        self.norm = (GlobalBatchNorm1d(dim, affine=False) if norm == "batchnorm"
                     else nn.LayerNorm(dim, elementwise_affine=False))
        self.head = nn.Linear(dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small start, as MAE's probe head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pool(self.token_norm(x.float()))))


def probe_heads(dim: int, n_classes: int, probes: dict[str, tuple[int, str]], n_heads: int, norm: str,
                seed: int) -> dict[str, tuple[int, Probe]]:
    """``probes``: name -> (layer, pooling) -> name -> (layer, Probe), each drawn right after
    seeding with ``seed``: every probe starts the same whatever was drawn before it (cached or
    online, trained or random-init model)."""
    out = {}
    for name, (layer, pooling) in probes.items():
        torch.manual_seed(seed)
        out[name] = (layer, Probe(dim, n_classes, pooling, n_heads, norm))
    return out
