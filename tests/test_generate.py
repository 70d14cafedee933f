"""Generation: the KV-cache path against the recompute-everything reference (the training
path), sampling filters on hand-made logits, and clear errors for impossible sizes."""

from __future__ import annotations

import math

import pytest
import torch

from toto.config import ModelConfig
from toto.errors import ConfigError
from toto.model.generate import (Generator, Sampling, decode_one, generate, pick_next, prefill, top_k_filter,
                                 top_p_filter, visual_ids_mask)
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


GREEDY = Sampling(greedy=True)


def test_cached_logits_and_greedy_match_uncached():
    m, p = tiny_model(), prompts()
    out_c, log_c = generate(m, p, 20, GREEDY, return_logits=True)
    out_u, log_u = generate(m, p, 20, GREEDY, return_logits=True, use_cache=False)
    assert out_c.shape == (3, 27)
    assert torch.equal(out_c[:, :7], p)
    assert torch.equal(out_c, out_u)
    assert (log_c - log_u).abs().max().item() < 1e-5
    # greedy really is the argmax of each step's logits
    assert torch.equal(out_c[:, 7:], log_c.argmax(-1))
    # the cache is released afterwards
    assert all(b.attn.cache is None for b in m.layers)


def test_prefill_and_decode_one_equal_the_uncached_forward_token_by_token():
    """Each cached step's logits are the training path's logits at that position of the whole
    sequence, and their argmax is the next token (greedy), step by step."""
    m, p = tiny_model(), prompts()
    m.setup_cache(3, 30)
    with torch.no_grad():
        seq, logits = p, prefill(m, p)
        for i in range(12):
            full = m(seq)  # the training path over everything so far, no cache
            assert torch.allclose(logits, full[:, -1], atol=1e-5), i
            nxt = full[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(logits.argmax(-1, keepdim=True), nxt), i
            logits = decode_one(m, nxt, torch.tensor([seq.shape[1]]))
            seq = torch.cat([seq, nxt], 1)
    m.clear_cache()


def test_seeded_sampling_identical_across_paths_and_reproducible():
    m, p = tiny_model(), prompts()
    s = Sampling(temperature=0.9, top_k=10, top_p=0.9, seed=123)
    a = generate(m, p, 16, s)
    b = generate(m, p, 16, s, use_cache=False)
    c = generate(m, p, 16, s)
    d = generate(m, p, 16, Sampling(temperature=0.9, top_k=10, top_p=0.9, seed=124))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    # sampling is not greedy here (the draws differ from the argmax somewhere)
    assert not torch.equal(a, generate(m, p, 16, GREEDY))


def test_batched_generation_equals_one_by_one():
    m, p = tiny_model(), prompts(B=3)
    together = generate(m, p, 12, GREEDY)
    for i in range(3):
        assert torch.equal(generate(m, p[i:i + 1], 12, GREEDY), together[i:i + 1])


def test_a_cache_on_the_model_is_used_when_it_fits_else_replaced():
    m, p = tiny_model(), prompts(B=2, T0=5)
    ref = generate(m, p, 10, GREEDY)
    m.setup_cache(4, 40)  # bigger than needed: used (stale slots are masked) and left in place
    cache = m.layers[0].attn.cache
    cache.k.normal_(), cache.v.normal_()  # garbage in the slots past the prompt must not matter
    assert torch.equal(generate(m, p, 10, GREEDY), ref)
    assert m.layers[0].attn.cache is cache
    for b, length in [(2, 12), (1, 40)]:  # 5 + 10 positions do not fit / batch too small
        m.setup_cache(b, length)
        assert torch.equal(generate(m, p, 10, GREEDY), ref)
        assert m.layers[0].attn.cache is None  # the cache generate allocated is freed


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
    with pytest.raises(ValueError, match="cannot hold 1 x 10 tokens"):
        m(prompts(B=1, T0=10), input_pos=torch.arange(10))
    with pytest.raises(ValueError, match=r"input_pos must be \(2,\)"):
        m(prompts(B=1, T0=2), input_pos=torch.tensor([3]))
    m.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        m(prompts(B=1, T0=3), input_pos=torch.arange(3))


def test_bad_sampling_arguments():
    m, p = tiny_model(), prompts()
    for kw, msg in [(dict(temperature=0), "temperature"), (dict(top_k=0), "top_k"),
                    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                    (dict(allowed=torch.zeros(LAYOUT.vocab_size, dtype=torch.bool)), "every token"),
                    (dict(allowed=torch.ones(LAYOUT.vocab_size)), "bool mask")]:
        with pytest.raises(ConfigError, match=msg):
            Sampling(**kw)
    with pytest.raises(ConfigError, match=r"allowed must be a \(32,\) bool mask"):
        generate(m, p, 2, Sampling(allowed=torch.ones(5, dtype=torch.bool)))


def test_allowed_mask_keeps_special_tokens_out():
    m, p = tiny_model(), prompts()
    with torch.no_grad():  # a dominant residual feature that only the end token's head row reads
        m.tok_emb.weight[:, 0] = 50.0
        m.head.weight[LAYOUT.end] = 0.0
        m.head.weight[LAYOUT.end, 0] = 20.0
    free = generate(m, p, 10, GREEDY)
    assert (free[:, 7:] == LAYOUT.end).all()
    allowed = visual_ids_mask(LAYOUT)
    for kw in (dict(greedy=True), dict(seed=0), dict(seed=1, top_k=3), dict(seed=2, top_p=0.5)):
        out = generate(m, p, 10, Sampling(allowed=allowed, **kw))
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
    ids = pick_next(logits, Sampling(top_k=2), g)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    assert freq[:2].sum() == 0
    assert abs(freq[2] - 3 / 7) < 0.015 and abs(freq[3] - 4 / 7) < 0.015
    # temperature 0.5 squares the probabilities: p_i^2 / sum p^2
    ids = pick_next(logits, Sampling(temperature=0.5), g)
    freq = torch.bincount(ids, minlength=4).float() / len(ids)
    want = torch.tensor([0.01, 0.04, 0.09, 0.16]) / 0.30
    assert (freq - want).abs().max() < 0.015


def test_prompt_in_chunks_equals_prompt_at_once():
    """The one cached path takes any number of tokens at any positions: a prompt written in
    two chunks, then one-token steps, gives the whole-sequence forward's logits."""
    m, p = tiny_model(), prompts()
    with torch.no_grad():
        full = m(p)
        m.setup_cache(3, 48)
        got = torch.cat([m(p[:, :3], input_pos=torch.arange(3)), m(p[:, 3:5], input_pos=torch.arange(3, 5))]
                        + [m(p[:, i:i + 1], input_pos=torch.tensor([i])) for i in (5, 6)], 1)
    m.clear_cache()
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """Generator(compile=True): same greedy tokens and logits, same seeded samples; a second
    call reuses the compiled step and the cache it left; nothing compiled lives on the model."""
    m, p = tiny_model(), prompts()
    keys, attrs = list(m.state_dict()), set(vars(m))
    out, logits = generate(m, p, 12, GREEDY, return_logits=True)
    gen = Generator(m, compile=True)
    out_c, logits_c = gen(p, 12, GREEDY, return_logits=True)
    assert list(m.state_dict()) == keys and set(vars(m)) == attrs  # no compiled step patched onto the model
    assert torch.equal(out, out_c)
    assert torch.allclose(logits, logits_c, atol=1e-4)
    cache = m.layers[0].attn.cache
    assert cache is not None and cache.k.shape[2] == 48  # full context, kept for the next call
    sampled = gen(p, 12, Sampling(seed=5, top_k=8))
    assert m.layers[0].attn.cache is cache
    assert torch.equal(sampled, generate(m, p, 12, Sampling(seed=5, top_k=8)))
    assert m.layers[0].attn.cache is cache  # eager generate used the kept cache and left it
    gen.close()
    assert m.layers[0].attn.cache is None
    gen(p[:1], 4, GREEDY)  # leaves a batch-1 cache...
    wide = prompts(B=5)
    assert torch.equal(gen(wide, 6, GREEDY), generate(m, wide, 6, GREEDY, use_cache=False))  # ...a wider batch replaces
    assert m.layers[0].attn.cache.k.shape[0] == 5
    gen.close()
    assert torch.equal(generate(m, p, 5, GREEDY, compile=True), out[:, :12])
    assert m.layers[0].attn.cache is None  # one-shot generate frees its cache
    with pytest.raises(ConfigError, match="needs use_cache=True"):
        Generator(m, compile=True, use_cache=False)
