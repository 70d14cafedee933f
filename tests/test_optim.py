"""The one schedule, parameter grouping, optimizer, autocast and target shift that every
training loop uses (toto.train.optim), against hand-computed values."""

import math

import pytest
import torch

from toto.config import build_config
from toto.train.optim import adamw, autocast_for, cosine_lr, param_groups, set_lr, shift_targets, uses_bf16


def test_lr_schedule_hand_values():
    c = build_config("tiny", None, ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110",
                                     "train.min_lr_ratio=0.1"]).train

    def lr_at(step):  # pre-training's binding: train.max_steps, warmup_steps, lr, min_lr_ratio
        return cosine_lr(step, c.max_steps, c.warmup_steps, c.lr, c.min_lr_ratio)

    # warm-up: step 0 gets lr / warmup, the last warm-up step the peak
    assert lr_at(0) == pytest.approx(0.1) and lr_at(9) == pytest.approx(1.0)
    assert lr_at(10) == pytest.approx(1.0)
    # half-way through the decay: the mean of peak and floor
    assert lr_at(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2))) == pytest.approx(0.55)
    # a quarter of the way: floor + (peak - floor) * (1 + cos(pi/4)) / 2
    assert lr_at(35) == pytest.approx(0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2)
    # the floor (lr * min_ratio) at the end and after it
    assert lr_at(110) == pytest.approx(0.1) and lr_at(500) == pytest.approx(0.1)


def test_schedule_without_warmup_starts_at_peak():
    assert cosine_lr(0, 100, 0, 2e-3) == 2e-3
    assert cosine_lr(50, 100, 0, 2e-3, 0.1) == pytest.approx(2e-4 + 0.5 * 1.8e-3)
    assert cosine_lr(100, 100, 0, 2e-3) == pytest.approx(0.0, abs=1e-18)


def test_set_lr_uses_base_lr_and_mup_scale():
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "base_lr": 1.0, "lr_scale": 0.25}, {"params": [b]}], lr=0.0)
    set_lr(opt, 60, 110, 10, 0.1, lr=2.0)  # half-way: (peak + floor) / 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55 * 0.25)  # its own base lr, times the muP scale
    assert opt.param_groups[1]["lr"] == pytest.approx(1.1)  # no base_lr: the lr given


def test_weight_decay_only_on_matrices():
    from toto.model.llama import Toto

    m = Toto(build_config("tiny", None, ["model.vocab_size=40", "model.max_seq_len=16"]).model)
    hidden, matrices, vectors = param_groups(m, 0.1, width_mult=4.0)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in hidden["params"]} == {"wqkv", "wo", "w13", "w2"}
    assert {names[id(p)] for p in matrices["params"]} == {"tok_emb.weight", "head.weight"}
    assert all(p.dim() == 1 for p in vectors["params"]) and vectors["weight_decay"] == 0.0
    assert hidden["weight_decay"] == matrices["weight_decay"] == 0.1
    assert hidden["lr_scale"] == 0.25 and matrices["lr_scale"] == vectors["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in (hidden, matrices, vectors)) == len(list(m.parameters()))


def test_adamw_decays_matrices_only():
    """One step with zero gradients: AdamW's decoupled decay shrinks the matrix by lr * wd and
    leaves the vector alone."""
    net = torch.nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    opt = adamw(param_groups(net, 0.5, base_lr=0.1), "cpu", 0.1, (0.9, 0.95))
    assert [g["base_lr"] for g in opt.param_groups] == [0.1, 0.1]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(net.weight, torch.full((2, 3), 1 - 0.1 * 0.5))
    assert torch.equal(net.bias, torch.ones(2))


def test_autocast_bf16_only_when_asked_on_cpu():
    x = torch.randn(4, 4)
    assert not uses_bf16("cpu", "auto") and uses_bf16("cpu", "bf16") and uses_bf16("cuda", "auto")
    with autocast_for("cpu", "auto"):
        assert (x @ x).dtype == torch.float32
    with autocast_for(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16


def test_shift_targets_ignores_pad():
    b = torch.tensor([[1, 5, 0, 2]])
    x, y = shift_targets(b, pad_id=0)
    assert x.tolist() == [[1, 5, 0]] and y.tolist() == [[5, -1, 2]]
