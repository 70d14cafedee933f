"""`toto params`: parameter counts of the presets next to the paper's figures (arXiv 2501.05453)."""

from __future__ import annotations

from .argtypes import positive_int

HELP = "print parameter counts of the model presets"

PAPER = {"base": 120e6, "large": 280e6, "1b": 1.1e9}


def add_arguments(p):
    p.add_argument("--vocab", type=positive_int, default=None, help="vocabulary size for presets that leave it open")


def run(args) -> int:
    from ..config import PRESETS, preset
    from ..model.llama import count_params
    from ..vocab import VocabLayout

    default_vocab = args.vocab or VocabLayout().vocab_size
    print(f"{'preset':<8}{'layers':>7}{'heads':>6}{'width':>7}{'ffn':>6}{'vocab':>7}{'params':>12}{'paper':>9}{'diff':>8}")
    for name in PRESETS:
        m = preset(name).model
        m.vocab_size = args.vocab or m.vocab_size or default_vocab
        n = count_params(m)
        paper = PAPER.get(name)
        ref = f"{paper / 1e6:.0f}M" if paper else "-"
        diff = f"{100 * (n - paper) / paper:+.1f}%" if paper else "-"
        print(f"{name:<8}{m.n_layers:>7}{m.n_heads:>6}{m.dim:>7}{m.ffn_dim:>6}{m.vocab_size:>7}"
              f"{n / 1e6:>11.1f}M{ref:>9}{diff:>8}")
    return 0
