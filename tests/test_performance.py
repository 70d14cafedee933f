"""Speed options must not change the maths: activation checkpointing and torch.compile give the
loss and gradients of the plain model; the one FLOPs-per-token count matches a hand count."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from toto.config import ModelConfig
from toto.model.llama import Toto


def tiny(seed=0, **kw) -> Toto:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(n_layers=3, n_heads=4, dim=64, ffn_dim=128, vocab_size=101, max_seq_len=32), **kw})
    return Toto(cfg)


def loss_and_grads(model, tokens, targets, forward=None):
    model.zero_grad(set_to_none=True)
    _, loss = (model if forward is None else forward)(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def count_block_calls(model) -> list[int]:
    calls = [0]
    for block in model.layers:
        block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def batch(model, B=3, T=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def test_activation_checkpointing_same_loss_and_gradients():
    model = tiny().train()
    tokens, targets = batch(model)
    calls = count_block_calls(model)
    loss0, grads0 = loss_and_grads(model, tokens, targets)
    assert calls[0] == 3  # one forward per block

    model.activation_checkpointing = True
    calls[0] = 0
    loss1, grads1 = loss_and_grads(model, tokens, targets)
    assert calls[0] == 6  # each block ran again during backward: checkpointing really happened
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-7, rtol=1e-6, msg=name)


def test_activation_checkpointing_is_off_in_eval_and_decoding():
    """No recomputation without gradients: eval passes and KV-cache decoding run blocks once."""
    model = tiny().eval()
    model.activation_checkpointing = True
    tokens, _ = batch(model, B=1, T=8)
    calls = count_block_calls(model)
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 8)
        step = torch.cat([model(tokens[:, :4], input_pos=torch.arange(4)),
                          model(tokens[:, 4:], input_pos=torch.arange(4, 8))], dim=1)
    assert calls[0] == 9  # 3 blocks x (1 full pass + 2 cached passes)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_sdpa_causal_matches_explicit_attention():
    """The is_causal SDPA path equals softmax(q k^T / sqrt(d) + causal mask) v computed by hand."""
    model = tiny(n_layers=1)
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 64)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    from toto.model.llama import apply_rope

    q, k, v = attn.wqkv(x).view(2, 10, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / 16 ** 0.5
    scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64))
    torch.testing.assert_close(attn(x, cos, sin, None), ref, atol=1e-5, rtol=1e-5)


def test_train_flops_formula_against_hand_count():
    """The one FLOPs convention (toto.model.llama.flops_per_token; the benchmarks' MFU and the
    scaling sweep's compute): 6 x every parameter but the embedding table (a lookup), plus the
    causal attention term 6 L T d. Tying the head to the embedding changes no computation."""
    from toto.model.llama import flops_per_token

    cfg = ModelConfig(n_layers=2, n_heads=4, dim=64, ffn_dim=128, vocab_size=101, max_seq_len=32)
    model = Toto(cfg)
    nonembed = sum(p.numel() for n, p in model.named_parameters() if n != "tok_emb.weight")
    assert flops_per_token(cfg, 32) == 6 * nonembed + 6 * 2 * 32 * 64
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    assert flops_per_token(tied, 32) == flops_per_token(cfg, 32)


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager():
    """torch.compile (inductor, CPU) of the tiny model: same loss and gradients as eager."""
    model = tiny(n_layers=1).train()
    tokens, targets = batch(model, B=2, T=16)
    loss0, grads0 = loss_and_grads(model, tokens, targets)
    try:
        compiled = torch.compile(model)
        loss1, grads1 = loss_and_grads(model, tokens, targets, forward=compiled)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ toolchain for inductor
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compile_falls_back_to_eager_when_the_backend_fails(monkeypatch, capsys):
    """train.compile must not break training where inductor cannot build kernels: with no
    usable C++ compiler the trainer's compiled forward runs the eager model instead."""
    import torch._inductor.config as inductor_config

    from toto.train.trainer import _try_compile

    torch._dynamo.reset()
    model = tiny(n_layers=1).eval()
    tokens, _ = batch(model, B=1, T=8)
    # inductor's own patch (monkeypatch's undo left the setting broken for later compile tests)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}), torch.no_grad():
        forward = _try_compile(model)
        out = forward(tokens)
        again = forward(tokens)  # later calls go straight to eager
        ref = model(tokens)
    assert "running eagerly" in capsys.readouterr().out
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    torch._dynamo.reset()
