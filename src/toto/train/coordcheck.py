"""muP coordinate check: the standard test that a parameterization transfers across widths.

Train a few AdamW steps at several widths on the same random tokens and record the average
absolute coordinate of each layer's activations. Under muP these stay flat as width grows;
under standard parameterization (SP) the later layers and the logits grow with width.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model.llama import Toto
from .optim import adamw, param_groups


def coord_sizes(width: int, mup_base_dim: int | None, steps: int = 4, lr: float = 1e-2,
                head_dim: int = 16, n_layers: int = 2, vocab: int = 64, seq: int = 32,
                batch: int = 8, seed: int = 0) -> list[dict[str, float]]:
    """Per step (0 = at init, before any update): mean |x| at the embedding, each block and
    the logits, measured on a fixed batch."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=n_layers, n_heads=width // head_dim, dim=width, ffn_dim=4 * width,
                      vocab_size=vocab, max_seq_len=seq, mup_base_dim=mup_base_dim)
    model = Toto(cfg)
    groups = param_groups(model, 0.0, model.width_mult)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    opt = adamw(groups, "cpu", lr, (0.9, 0.95))
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    history = []
    for step in range(steps + 1):
        with torch.no_grad():
            hs = model.hidden_states(x, list(range(n_layers + 1)))
            rec = {("embedding" if i == 0 else f"block{i}"): float(h.abs().mean()) for i, h in hs.items()}
            rec["logits"] = float(model(x).abs().mean())
        history.append(rec)
        if step < steps:
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return history


def coord_check(widths: list[int], steps: int = 4, lr: float = 1e-2, seeds: int = 3) -> dict:
    """{"sp"|"mup": {width: [per-step {layer: mean |x|}]}}, averaged over seeds."""
    base = min(widths)
    out: dict = {}
    for name, base_dim in (("sp", None), ("mup", base)):
        out[name] = {}
        for w in widths:
            runs = [coord_sizes(w, base_dim, steps, lr, seed=s) for s in range(seeds)]
            out[name][w] = [{k: sum(r[t][k] for r in runs) / seeds for k in runs[0][t]} for t in range(steps + 1)]
    return out


def plot_coord_check(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..ioutil import save_figure

    layers = list(next(iter(next(iter(result.values())).values()))[-1])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, per_width) in zip(axes, result.items()):
        widths = sorted(per_width)
        for layer in layers:
            ax.plot(widths, [per_width[w][-1][layer] for w in widths], marker="o", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width")
        ax.set_title(f"{name.upper()}: after {len(per_width[widths[0]]) - 1} AdamW steps")
    axes[0].set_ylabel("mean |activation|")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
