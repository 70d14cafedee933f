"""The one loader (toto.eval.backbone): every evaluation entry point refuses a tokenizer other
than the checkpoint's through the same check, with one line; the random-init baseline is the
Trainer's step-0 draw."""

from __future__ import annotations

import pytest
import torch

from toto.cli import main

N_CODES = 16  # eval_world's tokenizer (tests/conftest.py)


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
def test_every_entry_point_refuses_another_tokenizer_through_the_one_check(entry, eval_world, tmp_path,
                                                                          monkeypatch, capsys):
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
            _robot(eval_world, eval_world / "other.safetensors", out)
        err = str(e.value) + "\n"
    else:
        argv = [*ENTRY_POINTS[entry](eval_world, eval_world / "other.safetensors", out), "--checkpoint",
                eval_world / "run", "--tokenizer", eval_world / "other.safetensors", "--out", out, "--no-progress",
                "--device", "cpu"]
        assert main(list(map(str, argv))) == 2
        err = capsys.readouterr().err
    assert len(calls) == 1 and calls[0].endswith("step_00000001")  # the one check, once, on the checkpoint
    assert err.count("\n") == 1 and "was made with a different tokenizer (weights_sha256" in err, err
    assert "step_00000001" in err


def test_random_init_is_the_trainers_step0_draw_and_the_layers_are_checked(eval_world):
    from toto.errors import ConfigError
    from toto.eval.backbone import load_backbone
    from toto.eval.features import SequenceSpec
    from toto.model.llama import Toto

    bb = load_backbone(eval_world / "run", eval_world / "tok.safetensors", SequenceSpec("image"), "cpu")
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
