"""What every training loop shares: the learning-rate schedule, parameter groups, AdamW,
autocast and next-token targets.

Pre-training (``train/trainer.py``), the downstream-task loop (``tasks/base.py``: probing,
online probing, fine-tuning, CATER), dVAE training, Ego4D anticipation and the muP coordinate
check all take these from here, so a change to any of them reaches every job at once. The
paper (arXiv 2501.05453) pre-trains with AdamW and cosine decay after a linear warm-up on the
next-token loss.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..model.llama import is_hidden_matrix


# -- learning rate ------------------------------------------------------------------------------
def cosine_lr(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps (step 0 already gets ``lr / warmup``, so no
    step is wasted at zero), then cosine decay to ``lr * min_ratio`` at step ``total``; constant
    after. Every job's schedule is this one, with its own (total, warmup, min_ratio)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, warmup: int, min_ratio: float = 0.0,
           lr: float | None = None) -> None:
    """Set every group's learning rate for ``step``: the schedule at the group's ``base_lr``
    (or ``lr`` for groups without one), times its ``lr_scale`` (muP, see ``param_groups``)."""
    for g in opt.param_groups:
        g["lr"] = cosine_lr(step, total, warmup, g.get("base_lr", lr), min_ratio) * g.get("lr_scale", 1.0)


# -- parameters and optimizer -------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float, width_mult: float = 1.0,
                 base_lr: float | None = None) -> list[dict]:
    """Weight decay on matrices only (never norm gains or biases); under muP the hidden matrices
    learn at ``lr / width_mult`` (``lr_scale``). Groups are built from parameter names, which
    survive FSDP2 sharding (custom parameter attributes do not); empty groups are dropped.
    ``base_lr``, when given, is stored in each group for ``set_lr``."""
    hidden, matrices, vectors = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            vectors.append(p)
        elif is_hidden_matrix(name):
            hidden.append(p)
        else:
            matrices.append(p)
    groups = [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / width_mult},
              {"params": matrices, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0}]
    if base_lr is not None:
        for g in groups:
            g["base_lr"] = base_lr
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], device: torch.device | str, lr: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each group's ``weight_decay`` kept); the fused kernel on CUDA (one
    launch for all parameters), PyTorch's default implementation elsewhere."""
    kw = {"fused": True} if torch.device(device).type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kw)


# -- precision ----------------------------------------------------------------------------------
def uses_bf16(device: torch.device | str, dtype: str = "auto") -> bool:
    """bf16 autocast on GPU by default; plain fp32 on CPU unless bf16 is asked for."""
    return dtype == "bf16" or (dtype == "auto" and torch.device(device).type == "cuda")


def autocast_for(device: torch.device | str, dtype: str = "auto"):
    """The context every forward runs in: bf16 autocast when ``uses_bf16``, else nothing
    (weights stay fp32 either way)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- targets ------------------------------------------------------------------------------------
def shift_targets(batch: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch: (B, L)`` -> inputs ``(B, L-1)`` and next-token targets (pads ignored as -1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[targets == pad_id] = -1
    return inputs, targets
