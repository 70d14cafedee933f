import math

import pytest
import torch

from toto.config import ModelConfig, preset
from toto.model.llama import Toto, apply_rope, count_params, rope_tables


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, n_heads=4, dim=32, ffn_dim=64, vocab_size=50, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_rope_equals_complex_rotation():
    D, T, base = 16, 11, 10000.0
    x = torch.randn(1, 2, T, D, dtype=torch.float64)
    cos, sin = rope_tables(D, T, base)
    got = apply_rope(x.float(), cos, sin).double()
    # rotate-half layout: dims i and i + D/2 form the complex number x_i + j x_{i+D/2}
    z = torch.complex(x[..., : D // 2], x[..., D // 2:])
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.arange(T)[:, None] * theta)
    want = z * rot
    assert torch.allclose(got, torch.cat([want.real, want.imag], -1), atol=1e-5)


def test_rope_relative_positions():
    """q.k after RoPE depends only on the position difference."""
    D = 8
    cos, sin = rope_tables(D, 40, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, D), cos[i:i + 1], sin[i:i + 1])
        kj = apply_rope(k.view(1, 1, 1, D), cos[j:j + 1], sin[j:j + 1])
        return float((qi * kj).sum())

    assert math.isclose(score(5, 2), score(30, 27), rel_tol=1e-4, abs_tol=1e-5)


def test_causal_future_token_does_not_change_past_logits():
    torch.manual_seed(0)
    m = Toto(tiny()).eval()
    x = torch.randint(0, 50, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 7) % 50
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("tie", [False, True])
def test_param_count_formula(tie):
    cfg = tiny(tie_embeddings=tie)
    m = Toto(cfg)
    assert m.num_params() == count_params(cfg)
    d, f, v, n = 32, 64, 50, 2
    hand = n * (d * 3 * d + d * d + d * 2 * f + f * d + 2 * d) + v * d * (1 if tie else 2) + d
    assert count_params(cfg) == hand


def test_preset_counts_within_ten_percent_of_spec():
    paper = {"base": 120e6, "large": 280e6, "1b": 1.1e9}
    for name, ref in paper.items():
        n = count_params(preset(name).model)
        assert abs(n - ref) / ref < 0.10, (name, n)


def test_hidden_states_and_loss():
    torch.manual_seed(0)
    m = Toto(tiny()).eval()
    x = torch.randint(0, 50, (3, 9))
    hs = m.hidden_states(x, [0, 1, 2])
    assert set(hs) == {0, 1, 2} and hs[2].shape == (3, 9, 32)
    assert torch.equal(hs[0], m.tok_emb(x))
    logits, loss = m(x, x)
    assert torch.allclose(m.head(m.norm(hs[2])), logits, atol=1e-6)
    ref = -torch.log_softmax(logits, -1).gather(-1, x[..., None]).mean()
    assert torch.allclose(loss, ref, atol=1e-6)
    # ignore index -1 drops those positions from the mean
    t = x.clone()
    t[:, :4] = -1
    _, loss2 = m(x, t)
    ref2 = -torch.log_softmax(logits[:, 4:], -1).gather(-1, x[:, 4:, None]).mean()
    assert torch.allclose(loss2, ref2, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        m.hidden_states(x, [3])


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    m = Toto(tiny()).eval()
    x = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        full = m(x)
        m.setup_cache(2, 32)
        prefix = m(x[:, :6], input_pos=torch.arange(6))
        steps = [m(x[:, i:i + 1], input_pos=torch.tensor([i])) for i in range(6, 15)]
    m.clear_cache()
    inc = torch.cat([prefix] + steps, 1)
    assert torch.allclose(full, inc, atol=1e-5)


def test_context_and_shape_errors():
    m = Toto(tiny())
    with pytest.raises(ValueError, match="exceeds the model context"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model context"):
        m.setup_cache(1, 100)


def test_no_biases_and_untied_by_default():
    m = Toto(tiny())
    assert all("bias" not in n for n, _ in m.named_parameters())
    assert m.head.weight.data_ptr() != m.tok_emb.weight.data_ptr()
    t = Toto(tiny(tie_embeddings=True))
    assert t.head.weight.data_ptr() == t.tok_emb.weight.data_ptr()


def test_forward_layers_and_stop_at_match_block_by_block():
    """``forward(layers=, stop_at=)`` against the residual stream computed block by block by hand."""
    torch.manual_seed(0)
    m = Toto(tiny()).eval()
    tokens = torch.randint(0, m.cfg.vocab_size, (2, 9))
    targets = torch.randint(0, m.cfg.vocab_size, (2, 9))
    cos, sin = m.rope_cos[:9], m.rope_sin[:9]
    ref = [m.tok_emb(tokens)]
    for block in m.layers:
        ref.append(block(ref[-1], cos, sin))
    logits_ref = m.head(m.norm(ref[-1])) * m.logit_scale
    loss_ref = torch.nn.functional.cross_entropy(logits_ref.view(-1, logits_ref.shape[-1]), targets.view(-1))
    with torch.no_grad():
        (logits, loss), hidden = m(tokens, targets, layers=[0, 1])
        assert sorted(hidden) == [0, 1]
        torch.testing.assert_close(hidden[1], ref[1])
        torch.testing.assert_close(logits, logits_ref)
        torch.testing.assert_close(loss, loss_ref)
        only = m(tokens, layers=[1], stop_at=1)
        assert list(only) == [1]
        torch.testing.assert_close(only[1], ref[1])
    with pytest.raises(ValueError, match="beyond stop_at"):
        m(tokens, layers=[2], stop_at=1)
    with pytest.raises(ValueError, match="full depth"):
        m(tokens, targets, stop_at=1)
    with pytest.raises(ValueError, match="out of range"):
        m(tokens, layers=[len(m.layers) + 1])
