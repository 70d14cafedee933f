"""Autoregressive generation: prefill once, then one forward per new token against the KV cache.

``generate(model, prompt)`` is the fast path (static cache set up by ``Toto.setup_cache``);
``generate(..., compile=True)`` decodes with a compiled one-token step over fixed shapes (on GPU
replayed as a CUDA graph, as gpt-fast does); ``generate(..., use_cache=False)`` recomputes the whole prefix at every step. Both share the
sampling code below, so with the same seed they draw the same random numbers in the same order:
the uncached path is the reference the tests and the benchmark compare the cache against.

Sampling order per step: mask disallowed ids -> greedy argmax, or temperature -> top-k ->
top-p (nucleus) -> one multinomial draw from a ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..errors import ConfigError
from ..vocab import VocabLayout


def visual_ids_mask(layout: VocabLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """``allowed: (vocab,) bool``, True for visual codes only (no pad/start/end inside a frame)."""
    allowed = torch.zeros(layout.vocab_size, dtype=torch.bool, device=device)
    allowed[layout.code_offset:layout.code_offset + layout.n_codes] = True
    return allowed


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


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0 (use greedy decoding for argmax), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 (or unset), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must lie in (0, 1] (or unset), got {top_p}")


def pick_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
              top_p: float | None = None, greedy: bool = False, allowed: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``logits: (B, V)`` of the next position -> ``next ids: (B,) int64``."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if greedy:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_cache(model, batch: int, length: int) -> bool:
    """True when the caller set up a cache (then it must fit); False when generate owns one."""
    cache = model.layers[0].attn.cache
    if cache is None:
        return False
    cb, cl = cache.k.shape[0], cache.k.shape[2]
    if cb < batch or cl < length:
        raise ConfigError(f"the model's KV cache holds batch {cb} x {cl} positions, but generating needs "
                          f"batch {batch} x {length} positions (prompt + new tokens); call "
                          f"model.setup_cache({batch}, {length}) or clear_cache() and let generate allocate it")
    return True


def compiled_decoder(model):
    """``step(tokens (B, 1), pos (1,)) -> logits (B, 1, V)``, compiled once per model and reused by
    later calls. CUDA: mode "reduce-overhead" (CUDA graphs: one launch per token instead of
    one per kernel). Elsewhere the default inductor mode. ``fullgraph`` makes a graph break an
    error rather than a silent slowdown."""
    step = getattr(model, "_compiled_decode", None)
    if step is None:
        cuda = model.head.weight.device.type == "cuda"
        step = torch.compile(model, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False)
        object.__setattr__(model, "_compiled_decode", step)  # a plain attribute, not a submodule of itself
    return step


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             seed: int | None = None, allowed: torch.Tensor | None = None, *, use_cache: bool = True,
             return_logits: bool = False, progress: bool = False, compile: bool = False):
    """Continue ``prompt: (B, T0) int64`` by ``max_new_tokens`` ids -> ``(B, T0 + N) int64``.

    ``allowed: (vocab,) bool`` restricts which ids may be generated (e.g. ``visual_ids_mask``).
    With ``return_logits`` also returns the raw model logits of every step, ``(B, N, V)`` float32.
    ``compile`` pays a one-off compilation (tens of seconds) for faster decoding afterwards: worth
    it on GPU for long or repeated generations (``benchmarks/bench_generate.py`` measures it). It
    leaves a full-context KV cache on the model for the next call; ``model.clear_cache()`` frees it.
    """
    if compile and not use_cache:
        raise ConfigError("compile=True compiles the cached decode step; it needs use_cache=True")
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ConfigError(f"prompt must be (B, T0) with T0 >= 1, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    ctx = model.cfg.max_seq_len
    if total > ctx:
        raise ConfigError(f"prompt of {T0} tokens + {max_new_tokens} new tokens = {total} exceeds the model "
                          f"context max_seq_len={ctx}")
    V = model.cfg.vocab_size
    if allowed is not None:
        if allowed.shape != (V,) or allowed.dtype != torch.bool:
            raise ConfigError(f"allowed must be a ({V},) bool mask, got {tuple(allowed.shape)} {allowed.dtype}")
        if not bool(allowed.any()):
            raise ConfigError("allowed masks out every token id")
    device = model.head.weight.device
    prompt = prompt.to(device=device, dtype=torch.long)
    if allowed is not None:
        allowed = allowed.to(device)
    gen = None
    if seed is not None and not greedy:
        gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(B, total, dtype=torch.long, device=device)
    out[:, :T0] = prompt
    step_logits = torch.empty(B, max_new_tokens, V, dtype=torch.float32, device=device) if return_logits else None
    if max_new_tokens == 0:
        return (out, step_logits) if return_logits else out

    owns_cache = False
    decode = compiled_decoder(model) if compile else None
    if use_cache:
        kept = getattr(model, "_kept_cache", None)
        if kept is not None and kept is model.layers[0].attn.cache and kept.k.shape[0] < B:
            model.clear_cache()  # the cache an earlier compile=True call left is too small: replace it
        owns_cache = not _check_cache(model, B, total)
        if owns_cache and compile:  # a full-context cache that stays, so later calls reuse the compiled step
            model.setup_cache(B, ctx)
            object.__setattr__(model, "_kept_cache", model.layers[0].attn.cache)  # not a submodule
            owns_cache = False
        elif owns_cache:
            model.setup_cache(B, total)
    try:
        logits = model(prompt, pos=0)[:, -1] if use_cache else model(prompt)[:, -1]
        for i in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not progress, leave=False):
            if return_logits:
                step_logits[:, i] = logits.float()
            nxt = pick_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                            allowed=allowed, generator=gen)
            p = T0 + i
            out[:, p] = nxt
            if i + 1 == max_new_tokens:
                break
            if decode is not None:
                logits = decode(nxt[:, None], pos=torch.tensor([p], device=device))[:, -1]
            elif use_cache:
                logits = model(nxt[:, None], pos=p)[:, -1]
            else:
                logits = model(out[:, :p + 1])[:, -1]
    finally:
        if owns_cache:
            model.clear_cache()
    return (out, step_logits) if return_logits else out
