"""The Toto model: a LLaMA-style causal transformer over visual tokens, in one file.

Reads top to bottom: config (toto.config.ModelConfig), RMSNorm, rotary embeddings, attention
(a training path, and a KV-cache path at tensor positions for generation), SwiGLU MLP, block, model.

Choices worth knowing:
- RoPE uses the "rotate half" pair layout (dimension i pairs with i + head_dim/2), the layout
  of Hugging Face's Llama, so exported q/k weights need no permutation.
- q, k, v share one fused projection, and so do SwiGLU's gate and up projections: fewer,
  larger matmuls. No biases anywhere.
- The output head is untied from the token embedding by default, as in LLaMA: the embedding
  of a visual code and the direction that predicts it play different roles, and at 8k
  vocabulary the extra parameters are small (6.3M at width 768).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, validate_model
from ..errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def _check_memory(need: int, what: str) -> None:
    """Refuse at once an allocation larger than the memory available (Linux: MemAvailable),
    instead of filling the machine for a minute before the allocator gives up (a context of
    1e9 positions touched 12 GB first)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    if need > avail:
        raise MemoryError(f"{what} need {need / 2**30:.0f} GiB, {avail / 2**30:.0f} GiB is available")


def rope_tables(head_dim: int, max_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(max_len, head_dim)`` for the rotate-half layout.

    Computed in float32 exactly as Hugging Face's Llama does (inverse frequencies, then one
    float32 product per angle), so an exported model (``toto export --hf``) gives our logits at
    every position: float64 angles differ from these by up to ~1e-4 rad at position 1000 and
    the logits then drift apart with position (1.7e-4 at 1026 tokens on a trained tiny model).
    """
    _check_memory(max_len * (8 + 4 + 3 * 4 * head_dim), f"the RoPE tables of model.max_seq_len={max_len}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)  # (L, D/2) float32
    angles = torch.cat([angles, angles], dim=-1)  # (L, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: (B, H, T, D)`` by position; ``cos/sin: (T, D)``."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values ``(B, H, max_len, D)``, written at tensor positions.

    The one cache writer: ``index_copy_`` at ``input_pos`` and the whole buffers back, so the
    shapes never change from step to step (what torch.compile and CUDA graphs need, as in
    gpt-fast). Positions past the newest token hold stale or zero entries; the attention mask
    built from ``input_pos`` hides them."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, n_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = k.shape[0]
        if k.dtype != self.k.dtype:  # bf16 autocast over an fp32 model
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        self.k[:B].index_copy_(2, input_pos, k)
        self.v[:B].index_copy_(2, input_pos, v)
        return self.k[:B], self.v[:B]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.scale: float | None = None  # None: SDPA's 1/sqrt(head_dim); muP sets 1/head_dim
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Two paths: ``input_pos`` None is the training pass (causal, no cache); otherwise the
        tokens sit at ``input_pos: (T,)``, are written to the cache, and attend over the whole
        cache under ``mask: (T, max_len)``."""
        B, T, C = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            k, v = self.cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU: w2(silu(x W_gate) * (x W_up)); gate and up fused in ``w13``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, input_pos=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, input_pos, mask)
        return x + self.mlp(self.mlp_norm(x))


HIDDEN_MATRICES = ("wqkv.weight", "wo.weight", "w13.weight", "w2.weight")


def is_hidden_matrix(name: str) -> bool:
    """Matrices whose both dimensions grow with width (muP scales their init and lr)."""
    return name.endswith(HIDDEN_MATRICES)


class Toto(nn.Module):
    """Decoder-only transformer. ``tokens: (B, T) int64`` -> ``logits: (B, T, vocab)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None or cfg.max_seq_len is None:
            raise ConfigError("model.vocab_size and model.max_seq_len must be set (they come from "
                              "the data's index when left empty)")
        validate_model(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.activation_checkpointing = False
        # muP (Yang et al. 2022, "Table 8" form): with width multiplier m = dim / base_dim,
        # hidden matrices start at std/sqrt(m) and learn at lr/m (see toto.train.trainer),
        # output logits are multiplied by 1/m and attention scores use 1/head_dim.
        self.width_mult = cfg.dim / cfg.mup_base_dim if cfg.mup_base_dim else 1.0
        self.logit_scale = 1.0 / self.width_mult
        if cfg.mup_base_dim:
            for block in self.layers:
                block.attn.scale = 1.0 / cfg.head_dim
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif is_hidden_matrix(name):
                hidden_std = std / math.sqrt(self.width_mult)
                if name.endswith(("wo.weight", "w2.weight")):
                    # residual-branch outputs: keep the residual stream's variance flat in depth
                    hidden_std /= math.sqrt(2 * self.cfg.n_layers)
                nn.init.normal_(p, 0.0, hidden_std)
            else:  # token embedding and output head
                nn.init.normal_(p, 0.0, std)

    def num_params(self, include_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_embedding else n - self.tok_emb.weight.numel()

    def set_rope_base(self, base: float) -> None:
        """Change the RoPE base in place (resolution fine-tuning); weights are unchanged."""
        self.cfg.rope_base = base
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, base)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _check(self, tokens: torch.Tensor, input_pos: torch.Tensor | None) -> KVCache | None:
        """Shape checks only, and the cache for ``input_pos``: reading position values would
        sync a GPU at every decode step (``generate.Generator`` checks them as Python ints)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if input_pos is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the model context "
                                 f"max_seq_len={self.cfg.max_seq_len}")
            return None
        cache = self.layers[0].attn.cache
        if cache is None:
            raise RuntimeError("call setup_cache(batch, max_len) before decoding with input_pos=")
        if input_pos.shape != (T,):
            raise ValueError(f"input_pos must be ({T},), one position per token, got {tuple(input_pos.shape)}")
        if B > cache.k.shape[0] or T > cache.k.shape[2]:
            raise ValueError(f"KV cache of batch {cache.k.shape[0]} and length {cache.k.shape[2]} cannot "
                             f"hold {B} x {T} tokens")
        return cache

    def layer_stream(self, tokens: torch.Tensor, upto: int, input_pos: torch.Tensor | None = None):
        """Yield the residual stream ``(B, T, dim)`` after the embedding (layer 0) and after each
        block up to block ``upto``. Public so a caller can act between layers (the online probe
        trains a layer's probes before the next block runs); most callers want ``forward``."""
        cache, mask = self._check(tokens, input_pos), None
        if cache is None:
            T = tokens.shape[1]
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:  # token t sees the cache slots at or before its own position
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            # additive (T, max_len), built once per pass (every layer would convert a bool mask)
            future = torch.arange(cache.k.shape[2], device=tokens.device) > input_pos.unsqueeze(-1)
            mask = torch.zeros((), dtype=cache.k.dtype, device=tokens.device).masked_fill(future, float("-inf"))
        x = self.tok_emb(tokens)
        yield x
        for block in self.layers[:upto]:
            if self.activation_checkpointing and self.training and input_pos is None:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, input_pos, mask)
            yield x

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                input_pos: torch.Tensor | None = None, layers: list[int] | None = None,
                stop_at: int | None = None):
        """Logits ``(B, T, V)``; with ``targets: (B, T)`` the pair (logits, mean NLL, ignore index -1).

        ``layers``: also return the residual stream ``(B, T, dim)`` at these layers (0 = the
        embeddings, i = after block i, no final norm): the result becomes ``(out, {layer: x})``.
        ``stop_at``: run only blocks ``1..stop_at`` and return just that dict (no head, no
        logits); a frozen probe or a head on an inner layer pays for the layers it reads.

        ``input_pos: (T,) int64`` switches to cached decoding (gpt-fast style) against the KV
        cache of ``setup_cache``: ``tokens`` sit at these positions (a prompt at ``arange(T)``,
        one new token at ``[p]``). Shapes do not depend on the position values, so a one-token
        step compiles once and replays as a CUDA graph (``toto.model.generate``).
        """
        n = len(self.layers)
        want = set(layers or ())
        bad = sorted(l for l in want if not 0 <= l <= n)
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{n}")
        if stop_at is not None:
            if not 0 <= stop_at <= n:
                raise ValueError(f"stop_at={stop_at} out of range 0..{n}")
            if targets is not None:
                raise ValueError("stop_at skips the head: the next-token loss needs the full depth")
            if want and max(want) > stop_at:
                raise ValueError(f"layers {sorted(want)} lie beyond stop_at={stop_at}")
        hidden, x = {}, None
        for i, x in enumerate(self.layer_stream(tokens, n if stop_at is None else stop_at, input_pos)):
            if i in want:
                hidden[i] = x
        if stop_at is not None:
            return hidden
        out = logits = self.logits(x)
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            out = (logits, loss)
        return out if layers is None else (out, hidden)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The output head on a last-layer residual stream ``(..., dim)`` -> ``(..., vocab)``:
        public so a caller that needs a few positions (generation's prefill: the last one)
        skips the head on the others."""
        logits = self.head(self.norm(x))
        if self.logit_scale != 1.0:  # muP only: otherwise skip a pass over (B, T, vocab) both ways
            logits = logits * self.logit_scale
        return logits

    @torch.no_grad()
    def hidden_states(self, tokens: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        """Residual stream ``(B, T, dim)`` at each requested layer (0 = embeddings, i = after
        block i, no final norm); stops after the deepest one asked for."""
        return self.forward(tokens, layers=layers, stop_at=max(layers) if layers else 0)

    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        """Allocate (or replace) a KV cache of ``batch x max_len`` positions for ``input_pos``
        decoding; attention spans the whole cache, so a cache as long as the work is cheapest."""
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model context {self.cfg.max_seq_len}")
        p = self.head.weight
        for block in self.layers:
            block.attn.cache = KVCache(batch, self.cfg.n_heads, max_len, self.cfg.head_dim, p.dtype, p.device)

    def clear_cache(self) -> None:
        for block in self.layers:
            block.attn.cache = None


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (hand formula; tested against the module)."""
    d, f, v, n = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    emb = v * d * (1 if cfg.tie_embeddings else 2)
    return n * per_layer + emb + d


def nonembedding_params(cfg: ModelConfig) -> int:
    """Every parameter but the input embedding table (a lookup, no matmul). The output head is a
    real ``dim x vocab`` matmul and is kept, also when it shares its weights with the embedding."""
    return count_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)


def flops_per_token(cfg: ModelConfig, n_ctx: int) -> float:
    """Training FLOPs (forward + backward) per trained token at context ``n_ctx``:
    ``6 N + 6 n_layers n_ctx dim`` with ``N = nonembedding_params``.

    The one convention of the project, for the scaling-law compute axis and for the benchmarks'
    MFU alike: Kaplan et al. 2020 (table 1, times 3 for the backward pass), as the paper's
    scaling study (arXiv 2501.05453) plots loss against compute the way Kaplan et al. count it.
    6N: every weight takes part in one multiply-add forward and two backward. The attention
    term: per layer and token, QK^T and AV cost 2*dim FLOPs per key each and a causal query sees
    n_ctx/2 keys on average, so 2*n_ctx*dim forward. It counts the work a causal (flash) kernel
    does, unlike PaLM's 12*L*d*T, which also counts the masked half of the score matrix;
    tests/test_scaling.py checks both terms against torch's FLOP counter."""
    return 6.0 * nonembedding_params(cfg) + 6.0 * cfg.n_layers * n_ctx * cfg.dim
