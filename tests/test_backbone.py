"""The one loader (toto.eval.backbone): every evaluation entry point refuses a tokenizer other
than the checkpoint's through the same check, with one line; the random-init baseline is the
Trainer's step-0 draw."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toto.cli import main

N_CODES, RES = 16, 16  # a 2x2 grid of 8 px patches


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint trained with tokenizer ``tok`` (recorded in its state); ``other``: the same
    kind, size and resolution with another codebook, so only the weights' hash differs; a tiny
    image dataset in class folders."""
    from PIL import Image

    from toto.config import Config, ModelConfig
    from toto.model.llama import Toto
    from toto.tokenizers.patch import PatchTokenizer
    from toto.train.checkpoint import save_checkpoint
    from toto.vocab import VocabLayout

    d = tmp_path_factory.mktemp("backbone")
    rng = np.random.default_rng(0)
    cb = rng.uniform(0, 255, (N_CODES, 8 * 8 * 3)).astype(np.float32)
    tok = PatchTokenizer(cb, patch=8, resolution=RES)
    tok.save(d / "tok.safetensors")
    PatchTokenizer(cb[::-1].copy(), patch=8, resolution=RES).save(d / "other.safetensors")
    layout = VocabLayout(n_codes=N_CODES)
    cfg = Config(model=ModelConfig(n_layers=2, n_heads=2, dim=16, ffn_dim=32, vocab_size=layout.vocab_size,
                                   max_seq_len=64))
    cfg.train.seed = 7
    torch.manual_seed(0)
    save_checkpoint(d / "run", 1, Toto(cfg.model), cfg, {"vocab": layout.to_dict(), "tokenizer": tok.identity()})
    for split in ("train", "val"):
        for c in ("a", "b"):
            (d / "data" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(
                    d / "data" / split / c / f"{i}.png")
    (d / "data" / "cater.json").write_text(json.dumps({"videos": {}}))
    return d


def _robot(d, tok, out):
    from toto.robot.policy import TotoEncoder

    TotoEncoder.load(d / "run", tok, [1], context=1)


ENTRY_POINTS = {
    "probe": lambda d, tok, out: ["probe", "--data", d / "data", "--layers", "1"],
    "probe --online": lambda d, tok, out: ["probe", "--online", "--data", d / "data", "--layers", "1"],
    "finetune": lambda d, tok, out: ["finetune", "--data", d / "data"],
    "track": lambda d, tok, out: ["track", "--data", d / "davis"],
    "forecast": lambda d, tok, out: ["forecast", "--video", d / "clip.mp4"],
    "cater": lambda d, tok, out: ["cater", "--data", d / "data", "--no-random-init"],
    "anticipate train": lambda d, tok, out: ["anticipate", "train", "--clips", d, "--detections", d / "det.json",
                                             "--annotations", d],
    "robot encoder": _robot,
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_another_tokenizer_through_the_one_check(entry, world, tmp_path, monkeypatch,
                                                                          capsys):
    import toto.eval.backbone as backbone
    from toto.errors import CheckpointError

    calls = []
    real = backbone.check_compatible

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(backbone, "check_compatible", spy)
    out = tmp_path / "out"
    if entry == "robot encoder":  # `toto robot train` needs MuJoCo demos; its encoder is loaded here
        with pytest.raises(CheckpointError) as e:
            _robot(world, world / "other.safetensors", out)
        err = str(e.value) + "\n"
    else:
        argv = [*ENTRY_POINTS[entry](world, world / "other.safetensors", out), "--checkpoint", world / "run", "--tokenizer", world / "other.safetensors", "--out", out,
                "--no-progress", "--device", "cpu"]
        assert main(list(map(str, argv))) == 2
        err = capsys.readouterr().err
    assert len(calls) == 1 and calls[0].endswith("step_00000001")  # the one check, once, on the checkpoint
    assert err.count("\n") == 1 and "was made with a different tokenizer (weights_sha256" in err, err
    assert "step_00000001" in err


def test_random_init_is_the_trainers_step0_draw_and_the_layers_are_checked(world):
    from toto.errors import ConfigError
    from toto.eval.backbone import load_backbone
    from toto.eval.features import SequenceSpec
    from toto.model.llama import Toto

    bb = load_backbone(world / "run", world / "tok.safetensors", SequenceSpec("image"), "cpu")
    assert bb.layout.n_codes == N_CODES and bb.tok_id["weights_sha256"] == bb.tokenizer.fingerprint()
    torch.manual_seed(7)  # the run's train.seed, as Trainer seeds step 0
    want = Toto(bb.cfg.model).state_dict()
    models = bb.models(True)
    got = models["random_init"][0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["tok_emb.weight"], bb.model.state_dict()["tok_emb.weight"])
    assert models["random_init"][1]["seed"] == 7 and models["trained"][1]["step"] == 1
    assert bb.check_layers([0, 2]) == [0, 2]
    with pytest.raises(ConfigError, match="--layer 3 out of range: this model has layers 0..2"):
        bb.check_layers([1, 3])
