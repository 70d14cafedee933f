"""Generation: the KV-cache path against the recompute-everything reference, sampling filters
on hand-made logits, and clear errors for impossible sizes."""

from __future__ import annotations

import math

import pytest
import torch

from toto.config import ModelConfig
from toto.errors import ConfigError
from toto.model.generate import generate, pick_next, top_k_filter, top_p_filter, visual_ids_mask
from toto.model.llama import Toto
from toto.vocab import VocabLayout

LAYOUT = VocabLayout(n_codes=28)  # vocab 32


def tiny_model(seed: int = 0, max_seq_len: int = 48) -> Toto:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=LAYOUT.vocab_size,
                      max_seq_len=max_seq_len, init_std=0.2)  # large init: peaky, varied logits
    return Toto(cfg).eval()


def prompts(B: int = 3, T0: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(LAYOUT.code_offset, LAYOUT.vocab_size, (B, T0), generator=g)
    p[:, 0] = LAYOUT.video_start
    return p


def test_cached_logits_and_greedy_match_uncached():
    m, p = tiny_model(), prompts()
    out_c, log_c = generate(m, p, 20, greedy=True, return_logits=True)
    out_u, log_u = generate(m, p, 20, greedy=True, return_logits=True, use_cache=False)
    assert out_c.shape == (3, 27)
    assert torch.equal(out_c[:, :7], p)
    assert torch.equal(out_c, out_u)
    assert (log_c - log_u).abs().max().item() < 1e-5
    # greedy really is the argmax of each step's logits
    assert torch.equal(out_c[:, 7:], log_c.argmax(-1))
    # the cache is released afterwards
    assert all(b.attn.cache is None for b in m.layers)


def test_seeded_sampling_identical_across_paths_and_reproducible():
    m, p = tiny_model(), prompts()
    kw = dict(temperature=0.9, top_k=10, top_p=0.9, seed=123)
    a = generate(m, p, 16, **kw)
    b = generate(m, p, 16, use_cache=False, **kw)
    c = generate(m, p, 16, **kw)
    d = generate(m, p, 16, **{**kw, "seed": 124})
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    # sampling is not greedy here (the draws differ from the argmax somewhere)
    assert not torch.equal(a, generate(m, p, 16, greedy=True))


def test_batched_generation_equals_one_by_one():
    m, p = tiny_model(), prompts(B=3)
    together = generate(m, p, 12, greedy=True)
    for i in range(3):
        assert torch.equal(generate(m, p[i:i + 1], 12, greedy=True), together[i:i + 1])


def test_caller_cache_is_used_and_must_fit():
    m, p = tiny_model(), prompts(B=2, T0=5)
    ref = generate(m, p, 10, greedy=True)
    m.setup_cache(4, 40)  # bigger than needed: fine, and left in place for the caller
    assert torch.equal(generate(m, p, 10, greedy=True), ref)
    assert m.layers[0].attn.cache is not None
    m.setup_cache(2, 12)  # 5 + 10 positions do not fit
    with pytest.raises(ConfigError, match="KV cache holds batch 2 x 12"):
        generate(m, p, 10, greedy=True)
    m.setup_cache(1, 40)  # batch too small
    with pytest.raises(ConfigError, match="batch 2 x 15"):
        generate(m, p, 10, greedy=True)
    m.clear_cache()


def test_prompt_longer_than_context_is_an_error():
    m = tiny_model(max_seq_len=16)
    with pytest.raises(ConfigError, match="exceeds the model context max_seq_len=16"):
        generate(m, prompts(T0=10), 7)
    with pytest.raises(ConfigError, match="exceeds"):
        generate(m, prompts(T0=17), 0)
    generate(m, prompts(T0=10), 6)  # exactly the context is fine


def test_model_level_cache_errors():
    m = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds the model context"):
        m.setup_cache(1, 17)
    m.setup_cache(1, 8)
    with pytest.raises(ValueError, match="cannot hold batch 1 at positions 0..9"):
        m(prompts(B=1, T0=10), pos=0)
    m.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        m(prompts(B=1, T0=3), pos=0)


def test_bad_sampling_arguments():
    m, p = tiny_model(), prompts()
    for kw, msg in [(dict(temperature=0), "temperature"), (dict(top_k=0), "top_k"),
                    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ConfigError, match=msg):
            generate(m, p, 2, **kw)
    with pytest.raises(ConfigError, match="bool mask"):
        generate(m, p, 2, allowed=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="every token"):
        generate(m, p, 2, allowed=torch.zeros(LAYOUT.vocab_size, dtype=torch.bool))


def test_allowed_mask_keeps_special_tokens_out():
    m, p = tiny_model(), prompts()
    with torch.no_grad():  # a dominant residual feature that only the end token's head row reads
        m.tok_emb.weight[:, 0] = 50.0
        m.head.weight[LAYOUT.end] = 0.0
        m.head.weight[LAYOUT.end, 0] = 20.0
    free = generate(m, p, 10, greedy=True)
    assert (free[:, 7:] == LAYOUT.end).all()
    allowed = visual_ids_mask(LAYOUT)
    for kw in (dict(greedy=True), dict(seed=0), dict(seed=1, top_k=3), dict(seed=2, top_p=0.5)):
        out = generate(m, p, 10, allowed=allowed, **kw)
        new = out[:, 7:]
        assert ((new >= LAYOUT.code_offset) & (new < LAYOUT.vocab_size)).all(), kw


def test_visual_ids_mask_layout():
    mask = visual_ids_mask(LAYOUT)
    assert mask.shape == (32,)
    assert mask.sum() == 28
    assert not mask[:4].any() and mask[4:].all()


def test_top_k_on_hand_made_logits():
    x = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0], [0.0, -1.0, 4.0, 2.0, 3.0]])
    inf = float("-inf")
    assert top_k_filter(x, 2).tolist() == [[inf, 5.0, inf, 5.0, inf], [inf, inf, 4.0, inf, 3.0]]
    assert top_k_filter(x, 3).tolist() == [[inf, 5.0, 3.0, 5.0, inf], [inf, inf, 4.0, 2.0, 3.0]]
    assert torch.equal(top_k_filter(x, 99), x)


def test_top_p_on_hand_made_logits():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # ranked: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    x = probs.log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(x, p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.3) == [1]           # the top id alone reaches 0.3
    assert kept(0.5) == [1]           # ... and exactly 0.5
    assert kept(0.7) == [1, 3]        # 0.5 < 0.7 <= 0.8
    assert kept(0.81) == [0, 1, 3]    # 0.8 < 0.81 <= 0.95
    assert kept(0.96) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3]


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[math.log(0.1), math.log(0.2), math.log(0.3), math.log(0.4)]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    # top-k 2 keeps 0.3 and 0.4 -> renormalised 3/7, 4/7
    ids = pick_next(logits, top_k=2, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    assert freq[:2].sum() == 0
    assert abs(freq[2] - 3 / 7) < 0.015 and abs(freq[3] - 4 / 7) < 0.015
    # temperature 0.5 squares the probabilities: p_i^2 / sum p^2
    ids = pick_next(logits, temperature=0.5, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    want = torch.tensor([0.01, 0.04, 0.09, 0.16]) / 0.30
    assert (freq - want).abs().max() < 0.015


def test_tensor_position_decode_equals_slice_decode():
    """The fixed-shape step (whole cache, masked) gives the logits of the sliced-cache step."""
    m, p = tiny_model(), prompts()
    m.setup_cache(3, 48)
    m(p, pos=0)
    want = [m(p[:, i:i + 1], pos=7 + i) for i in range(4)]
    m.clear_cache()
    m.setup_cache(3, 48)
    m(p, pos=0)
    got = [m(p[:, i:i + 1], pos=torch.tensor([7 + i])) for i in range(4)]
    for w, g in zip(want, got):
        assert torch.allclose(w, g, atol=1e-5)
    with pytest.raises(ValueError, match="tensor pos decodes one token"):
        m(p[:, :2], pos=torch.tensor([9]))
    m.clear_cache()


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """generate(compile=True): same greedy tokens and logits, same seeded samples; the second
    call reuses the compiled step and the cache it left."""
    m, p = tiny_model(), prompts()
    keys = list(m.state_dict())
    out, logits = generate(m, p, 12, greedy=True, return_logits=True)
    out_c, logits_c = generate(m, p, 12, greedy=True, return_logits=True, compile=True)
    assert list(m.state_dict()) == keys  # the compiled step is not registered inside the model
    assert torch.equal(out, out_c)
    assert torch.allclose(logits, logits_c, atol=1e-4)
    cache = m.layers[0].attn.cache
    assert cache is not None and cache.k.shape[2] == 48  # full context, kept for the next call
    step = m._compiled_decode
    sampled = generate(m, p, 12, seed=5, top_k=8, compile=True)
    assert m._compiled_decode is step and m.layers[0].attn.cache is cache
    m.clear_cache()
    assert torch.equal(sampled, generate(m, p, 12, seed=5, top_k=8))
    generate(m, p[:1], 4, greedy=True, compile=True)  # leaves a batch-1 cache...
    wide = prompts(B=5)
    assert torch.equal(generate(m, wide, 6, greedy=True, compile=True),  # ...which a wider batch replaces
                       generate(m, wide, 6, greedy=True, use_cache=False))
    with pytest.raises(ConfigError, match="needs use_cache=True"):
        generate(m, p, 3, compile=True, use_cache=False)
