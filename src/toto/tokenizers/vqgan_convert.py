"""Read a taming-transformers VQGAN checkpoint (``last.ckpt``, optional ``model.yaml``) safely.

The checkpoint is a PyTorch Lightning file: ``torch.save`` of a dict with ``state_dict`` (the
``VQModel``'s tensors, including its training loss: LPIPS and the discriminator), plus
``optimizer_states``, ``callbacks`` (keyed by Lightning classes in Lightning 1.x), and in some
files ``hyper_parameters`` (Lightning ``AttributeDict`` / omegaconf objects). ``torch.load`` with
``weights_only=True`` refuses those classes, and loading it normally needs Lightning and lets the
pickle run code. We read it with ``safe_pickle.restricted_load``: Lightning, omegaconf, numpy and
taming classes become inert holders, nothing runs, and only the tensors of ``encoder``,
``quant_conv``, ``quantize.embedding``, ``post_quant_conv`` and ``decoder`` are kept.

The architecture is read from the weight shapes; a YAML config (taming's ``model.yaml``:
``model.params.ddconfig``, ``n_embed``, ``embed_dim``), when given, is validated and must agree
with them field by field.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError, DataError
from .safe_pickle import restricted_load
from .vqgan import CONFIG_NAMES, VQGAN, VQGANConfig, VQGANTokenizer

KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")
_INERT = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.", "taming.", "numpy.",
          "_codecs.", "argparse.", "pathlib.", "torch.nn.modules.", "torch.optim.")
_TARGET = "taming.models.vqgan.VQModel"
# ddconfig keys taming accepts that toto supports only at one value (key -> required value)
_FIXED = {"double_z": False, "give_pre_end": False, "tanh_out": False, "attn_type": "vanilla",
          "use_linear_attn": False}
# VQModel params that only matter for training or logging
_IGNORED_PARAMS = {"lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor",
                   "sane_index_shape", "batch_resize_range", "scheduler_config", "lr_g_factor"}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``VQModel`` tensors of a Lightning checkpoint (or of a plain saved state dict), only
    those toto keeps. A file of another model is a one-line ``DataError`` that says what it holds."""
    obj = restricted_load(path, "taming VQModel checkpoint", inert=_INERT,
                          hint="a Lightning checkpoint of a taming VQModel holds tensors, dicts and Lightning/"
                               "omegaconf/numpy objects only")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        sd = obj  # torch.save(model.state_dict())
    else:
        keys = ", ".join(map(str, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: not a Lightning checkpoint of a taming VQModel (no 'state_dict'; holds {keys})")
    names = [k for k in sd if isinstance(k, str)]
    if any(k.startswith("first_stage_model.") for k in names):
        raise DataError(f"{path}: a taming transformer checkpoint (first_stage_model.*), not a VQModel; use the "
                        f"VQGAN's own checkpoint")
    if "quantize.embed.weight" in sd or "quantize.proj.weight" in sd:
        raise DataError(f"{path}: a GumbelVQ model (quantize.proj/quantize.embed); only VQModel "
                        f"(VectorQuantizer codebook quantize.embedding) is supported")
    if "quantize.used" in sd:
        raise DataError(f"{path}: the quantizer has a remap table (quantize.used, the 'remap' option), "
                        f"which toto does not support")
    for k in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight"):
        if k not in sd:
            prefixes = sorted({n.split(".")[0] for n in names})
            raise DataError(f"{path}: not a taming VQModel: no tensor {k} (its state_dict has "
                            f"{', '.join(prefixes[:8]) or 'no tensors'})")
    return {k: v for k, v in sd.items() if k.startswith(KEEP) and torch.is_tensor(v)}


def config_from_weights(sd: dict[str, torch.Tensor], path: str, model_resolution: int = 256,
                        resolution: int = 256) -> VQGANConfig:
    """The architecture from the tensor shapes. The weights do not store taming's
    ``ddconfig.resolution``; it only places the attention, which is read from the weights, so
    ``attn_resolutions`` is expressed at ``model_resolution`` (256 in the public configs)."""
    try:
        ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        mult = []
        for i in levels:
            c = sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]
            if c % ch:
                raise DataError(f"{path}: encoder level {i} has {c} channels, not a multiple of ch {ch}")
            mult.append(c // ch)
        blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        attn = [model_resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd]
        n_embed, embed_dim = sd["quantize.embedding.weight"].shape
        z_out = sd["encoder.conv_out.weight"].shape[0]
        z = sd["quant_conv.weight"].shape[1]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as e:
        raise DataError(f"{path}: missing tensor {e}; not a taming VQModel") from None
    if z_out != z:
        raise DataError(f"{path}: encoder.conv_out gives {z_out} channels but quant_conv takes {z} "
                        f"(ddconfig.double_z true?); not a VQModel layout")
    try:
        return VQGANConfig(n_embed=int(n_embed), embed_dim=int(embed_dim), ch=int(ch), ch_mult=tuple(mult),
                           num_res_blocks=blocks, attn_resolutions=tuple(attn), z_channels=int(z),
                           in_channels=int(in_ch), out_ch=int(out_ch), model_resolution=model_resolution,
                           resamp_with_conv="encoder.down.0.downsample.conv.weight" in sd or len(mult) == 1,
                           resolution=resolution).validate(f"{path} (read from its weights)")
    except ConfigError as e:
        raise DataError(str(e)) from None


def config_from_yaml(path: str | Path, resolution: int = 256) -> VQGANConfig:
    """taming's ``model.yaml`` -> ``VQGANConfig``; a field toto does not support is named."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"VQGAN config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a YAML file ({type(e).__name__}: {e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: no model.params mapping (expected taming's VQModel config)")
    target = model.get("target", _TARGET)
    if target != _TARGET:
        raise ConfigError(f"{path}: model.target is {target}; only {_TARGET} is supported")
    dd = params.get("ddconfig")
    if not isinstance(dd, dict):
        raise ConfigError(f"{path}: model.params.ddconfig missing or not a mapping")
    for k in ("n_embed", "embed_dim"):
        if k not in params:
            raise ConfigError(f"{path}: model.params.{k} missing")
    if params.get("remap") is not None:
        raise ConfigError(f"{path}: model.params.remap is set; codebook remapping is not supported")
    unknown = set(params) - {"ddconfig", "n_embed", "embed_dim", "remap"} - _IGNORED_PARAMS
    if unknown:
        raise ConfigError(f"{path}: model.params.{sorted(unknown)[0]} is not a VQModel option toto knows")
    ours = {v.split(".", 1)[1]: k for k, v in CONFIG_NAMES.items() if v.startswith("ddconfig.")}
    kw = {"n_embed": params["n_embed"], "embed_dim": params["embed_dim"], "resolution": resolution}
    for k, v in dd.items():
        if k in _FIXED:
            if v != _FIXED[k]:
                raise ConfigError(f"{path}: model.params.ddconfig.{k} is {v!r}; toto supports only {_FIXED[k]!r}")
        elif k == "dropout":
            continue  # training only
        elif k in ours:
            kw[ours[k]] = tuple(v) if isinstance(v, list) else v
        else:
            raise ConfigError(f"{path}: model.params.ddconfig.{k} is not an option toto knows")
    missing = [k for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution")
               if k not in dd]
    if missing:
        raise ConfigError(f"{path}: model.params.ddconfig.{missing[0]} missing")
    return VQGANConfig(**kw).validate(str(path), prefix="model.params.")


def convert_vqgan(checkpoint: str | Path, config: str | Path | None = None, resolution: int = 256,
                  device: str = "cpu") -> VQGANTokenizer:
    """A taming checkpoint (and optionally its YAML) -> ``VQGANTokenizer`` (``.save(path)`` writes it)."""
    from .dvae import load_state

    sd = read_checkpoint(checkpoint)
    if config is not None:
        cfg = config_from_yaml(config, resolution)
        found = config_from_weights(sd, str(checkpoint), cfg.model_resolution, resolution)
        for name in CONFIG_NAMES:
            want, got = getattr(cfg, name), getattr(found, name)
            if want != got:
                raise DataError(f"{config}: model.params.{CONFIG_NAMES[name]} is {_show(want)} but checkpoint "
                                f"{checkpoint} has {_show(got)}; they do not belong together")
    else:
        cfg = config_from_weights(sd, str(checkpoint), resolution=resolution)
    model = VQGAN(cfg)
    load_state(model, sd, str(checkpoint))
    return VQGANTokenizer(cfg, model, device=device, source=f"converted from taming checkpoint {Path(checkpoint).name}")


def _show(v) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)
