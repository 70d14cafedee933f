import pytest
import torch

from toto.config import ModelConfig
from toto.model.llama import Toto
from toto.train.coordcheck import coord_sizes


def test_mup_multipliers_and_init():
    base = ModelConfig(n_layers=2, n_heads=2, dim=32, ffn_dim=64, vocab_size=40, max_seq_len=16, mup_base_dim=32)
    wide = ModelConfig(n_layers=2, n_heads=8, dim=128, ffn_dim=256, vocab_size=40, max_seq_len=16, mup_base_dim=32)
    torch.manual_seed(0)
    mb, mw = Toto(base), Toto(wide)
    assert mw.width_mult == 4 and mw.logit_scale == 0.25 and mw.layers[0].attn.scale == 1 / 16
    assert mb.logit_scale == 1.0
    # hidden matrices start 1/sqrt(m) narrower; embeddings and head keep the base std
    ratio = float(mw.layers[0].attn.wqkv.weight.std() / mb.layers[0].attn.wqkv.weight.std())
    assert ratio == pytest.approx(0.5, rel=0.1)
    assert float(mw.tok_emb.weight.std()) == pytest.approx(0.02, rel=0.1)
    assert float(mw.head.weight.std()) == pytest.approx(0.02, rel=0.1)


def test_coordinate_check_flat_under_mup_not_under_sp():
    """The standard muP test: activation scale per layer after a few steps vs width."""
    narrow, wide = 32, 128
    sp = [coord_sizes(w, None, steps=3)[-1] for w in (narrow, wide)]
    mup = [coord_sizes(w, narrow, steps=3)[-1] for w in (narrow, wide)]
    for layer in ("block1", "block2"):
        assert sp[1][layer] / sp[0][layer] > 3.0, (layer, sp)
        assert 0.75 < mup[1][layer] / mup[0][layer] < 1.33, (layer, mup)
    assert 0.5 < mup[1]["logits"] / mup[0]["logits"] < 1.5
    assert sp[1]["logits"] / sp[0]["logits"] > 1.5
