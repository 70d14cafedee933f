"""Autoregressive generation, gpt-fast style: ``prefill`` the prompt into the KV cache once,
then ``decode_one`` token at a time (``decode_n`` runs the loop and the sampling).

``Generator(model)`` owns what generation needs beside the weights: the KV cache's size and,
with ``compile=True``, the compiled one-token step (on GPU replayed as a CUDA graph). The
compiled step lives on the ``Generator``, never on the model. ``generate(...)`` is one call of
a fresh ``Generator``. ``use_cache=False`` recomputes the whole prefix with the training path at
every step: the reference the tests and benchmarks compare the cache against. Both paths share
``decode_n``, so with the same seed they draw the same random numbers in the same order.

Sampling per step (``Sampling``): mask disallowed ids -> greedy argmax, or temperature ->
top-k -> top-p (nucleus) -> one multinomial draw from a ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..vocab import VocabLayout


def visual_ids_mask(layout: VocabLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """``allowed: (vocab,) bool``, True for visual codes only (no pad/start/end inside a frame)."""
    allowed = torch.zeros(layout.vocab_size, dtype=torch.bool, device=device)
    allowed[layout.code_offset:layout.code_offset + layout.n_codes] = True
    return allowed


@dataclass(frozen=True, eq=False)
class Sampling:
    """How the next id is picked from a step's logits; checked on construction."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False  # argmax (after the ``allowed`` mask); the other fields are then unused
    seed: int | None = None  # None: torch's global random state
    allowed: torch.Tensor | None = None  # (vocab,) bool: ids that may be generated (visual_ids_mask)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (use greedy decoding for argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1] (or unset), got {self.top_p}")
        if self.allowed is not None:
            if self.allowed.dim() != 1 or self.allowed.dtype != torch.bool:
                raise ConfigError(f"allowed must be a (vocab,) bool mask, got {tuple(self.allowed.shape)} "
                                  f"{self.allowed.dtype}")
            if not bool(self.allowed.any()):
                raise ConfigError("allowed masks out every token id")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties with the k-th are kept), the rest -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability sums to at least ``p``."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    # drop an id when the ids ranked above it already reach p (the top id is always kept)
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick_next(logits: torch.Tensor, s: Sampling = Sampling(), rng: torch.Generator | None = None) -> torch.Tensor:
    """``logits: (B, V)`` of the next position -> ``next ids: (B,) int64``."""
    logits = logits.float()
    if s.allowed is not None:
        logits = logits.masked_fill(~s.allowed, float("-inf"))
    if s.greedy:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None and s.top_p < 1:
        logits = top_p_filter(logits, s.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(-1)


def prefill(model, prompt: torch.Tensor) -> torch.Tensor:
    """Write ``prompt: (B, T0)`` into the KV cache at positions ``0..T0-1``; return the
    next-token logits ``(B, V)``. The head runs on the last position only (at a 1k-token prompt
    and an 8k vocabulary the other positions' logits would cost more than the blocks)."""
    n = len(model.layers)
    x = model(prompt, input_pos=torch.arange(prompt.shape[1], device=prompt.device), layers=[n], stop_at=n)[n]
    return model.logits(x[:, -1])


def decode_one(model, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One cached step: ``token: (B, 1)`` at ``input_pos: (1,)`` -> next-token logits ``(B, V)``.
    Shapes never depend on the position, so this is the function ``Generator`` compiles."""
    return model(token, input_pos=input_pos)[:, -1]


def decode_n(step: Callable[[torch.Tensor, int], torch.Tensor], logits: torch.Tensor, out: torch.Tensor,
             start: int, s: Sampling, rng: torch.Generator | None = None, *,
             step_logits: torch.Tensor | None = None, progress: bool = False) -> None:
    """Fill ``out[:, start:]`` one id at a time: pick from ``logits``, write it at position ``p``,
    then ``step(out, p)`` gives the logits after it. ``step_logits: (B, N, V)`` records each
    step's logits (before sampling)."""
    end = out.shape[1]
    for p in tqdm(range(start, end), desc="generate", unit="tok", disable=not progress, leave=False):
        if step_logits is not None:
            step_logits[:, p - start] = logits.float()
        out[:, p] = pick_next(logits, s, rng)
        if p + 1 < end:
            logits = step(out, p)


class Generator:
    """Generation with one model: sizes the model's KV cache and holds the compiled step.

    ``compile=True`` pays a one-off compilation (tens of seconds) for faster decoding after it:
    worth it on GPU for long or repeated generations (``benchmarks/bench_generate.py``). CUDA:
    mode "reduce-overhead" (CUDA graphs: one launch per token instead of one per kernel);
    ``fullgraph`` makes a graph break an error rather than a silent slowdown. The compiled step
    wants fixed shapes, so it keeps a full-context cache between calls (``close()`` frees it).
    Eager decoding uses a cache already on the model when it fits, else allocates one of exactly
    prompt + new tokens (attention spans the whole cache) and frees it afterwards.
    """

    def __init__(self, model, *, compile: bool = False, use_cache: bool = True):
        if compile and not use_cache:
            raise ConfigError("compile=True compiles the cached decode step; it needs use_cache=True")
        self.model, self.use_cache, self.compiled = model, use_cache, compile
        self._decode = decode_one
        if compile:
            cuda = model.head.weight.device.type == "cuda"
            self._decode = torch.compile(decode_one, mode="reduce-overhead" if cuda else None,
                                         fullgraph=True, dynamic=False)

    def close(self) -> None:
        """Free the model's KV cache."""
        self.model.clear_cache()

    def _reserve(self, batch: int, length: int) -> bool:
        """Make the model's cache hold ``batch x length``; True when this call allocated it."""
        model, ctx = self.model, self.model.cfg.max_seq_len
        have = model.layers[0].attn.cache
        if self.compiled:  # fixed shapes: full context, and the largest batch seen so far
            if have is None or have.k.shape[0] < batch or have.k.shape[2] != ctx:
                model.setup_cache(max(batch, 0 if have is None else have.k.shape[0]), ctx)
            return False
        if have is not None and have.k.shape[0] >= batch and have.k.shape[2] >= length:
            return False  # set up by the caller or by a compiled Generator: use it, leave it
        model.setup_cache(batch, length)
        return True

    @torch.no_grad()
    def __call__(self, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 return_logits: bool = False, progress: bool = False):
        """Continue ``prompt: (B, T0) int64`` by ``max_new_tokens`` ids -> ``(B, T0 + N) int64``;
        with ``return_logits`` also the raw logits of every step, ``(B, N, V)`` float32."""
        model, s = self.model, sampling
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ConfigError(f"prompt must be (B, T0) with T0 >= 1, got shape {tuple(prompt.shape)}")
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        B, T0 = prompt.shape
        total, ctx, V = T0 + max_new_tokens, model.cfg.max_seq_len, model.cfg.vocab_size
        if total > ctx:
            raise ConfigError(f"prompt of {T0} tokens + {max_new_tokens} new tokens = {total} exceeds the model "
                              f"context max_seq_len={ctx}")
        if s.allowed is not None and s.allowed.shape != (V,):
            raise ConfigError(f"allowed must be a ({V},) bool mask, got {tuple(s.allowed.shape)}")
        device = model.head.weight.device
        if s.allowed is not None:
            s = dataclasses.replace(s, allowed=s.allowed.to(device))
        rng = None if s.seed is None or s.greedy else torch.Generator(device=device).manual_seed(s.seed)
        out = torch.empty(B, total, dtype=torch.long, device=device)
        out[:, :T0] = prompt.to(device=device, dtype=torch.long)
        step_logits = torch.empty(B, max_new_tokens, V, dtype=torch.float32, device=device) if return_logits else None
        if max_new_tokens:
            if self.use_cache:
                owned = self._reserve(B, total)
                try:
                    positions = torch.arange(total, device=device)  # no host-to-device copy per step
                    decode_n(lambda o, p: self._decode(model, o[:, p:p + 1], positions[p:p + 1]),
                             prefill(model, out[:, :T0]), out, T0, s, rng, step_logits=step_logits,
                             progress=progress)
                finally:
                    if owned:
                        self.close()
            else:
                decode_n(lambda o, p: model(o[:, :p + 1])[:, -1], model(out[:, :T0])[:, -1], out, T0, s, rng,
                         step_logits=step_logits, progress=progress)
        return (out, step_logits) if return_logits else out


def generate(model, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(), *,
             compile: bool = False, use_cache: bool = True, return_logits: bool = False, progress: bool = False):
    """One generation with a fresh ``Generator`` (its cache is freed afterwards); keep a
    ``Generator`` to reuse a compiled step across calls."""
    gen = Generator(model, compile=compile, use_cache=use_cache)
    try:
        return gen(prompt, max_new_tokens, sampling, return_logits=return_logits, progress=progress)
    finally:
        if compile:
            gen.close()
