"""Read OpenAI's ``encoder.pkl`` / ``decoder.pkl`` without the ``dall-e`` package or arbitrary code.

The official files are whole modules saved with ``torch.save`` (pickles of ``dall_e.Encoder`` /
``dall_e.Decoder`` objects).  Loading them normally imports the package and lets the pickle call
any function.  Here ``torch.load`` runs with a restricted unpickler instead: the only callables
it will resolve are torch's tensor/parameter rebuild functions, storage types, ``torch.device``,
``OrderedDict`` and ``set``; every ``dall_e.*`` and ``torch.nn.*`` class becomes a plain
``_Holder`` that just keeps its attribute dict.  Anything else in the pickle is refused.  From the
holders we read the parameters under their module paths (``blocks.group_1.block_1...``) and the
hyper-parameters from the weight shapes.
"""

from __future__ import annotations

import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import DataError
from .dvae import DVAEConfig, Decoder, DVAETokenizer, Encoder, load_state

_ENCODER, _DECODER = "dall_e.encoder.Encoder", "dall_e.decoder.Decoder"


class _Holder:
    """Stands in for a pickled module class; keeps the object's state and its class name."""

    _qualname = "?"

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict, slots) form
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state)


def _holder_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (_Holder,), {"_qualname": qualname})


def _device(*args):
    return str(args[0]) if args else "cpu"


_ALLOWED_TORCH_UTILS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                        "_rebuild_parameter_with_state"}


class _Unpickler(pickle.Unpickler):
    where = ""

    def find_class(self, module: str, name: str):
        if module in ("__builtin__", "builtins") and name == "set":
            return set
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in _ALLOWED_TORCH_UTILS:
            return getattr(torch._utils, name)
        if module == "torch" and name == "device":
            return _device
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module.startswith("dall_e.") or module.startswith("torch.nn.modules."):
            return _holder_class(f"{module}.{name}")
        raise DataError(f"{self.where}: refusing to load {module}.{name} from the pickle "
                        f"(a dall-e encoder/decoder file holds only dall_e and torch.nn modules and tensors)")


def _pickle_module(where: str) -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``."""
    mod = types.ModuleType("toto_dalle_pickle")
    unpickler = type("Unpickler", (_Unpickler,), {"where": where})
    mod.Unpickler = unpickler
    mod.load = lambda f, **kw: unpickler(f, **kw).load()
    mod.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return mod


def _state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a holder tree, named as ``nn.Module.state_dict`` would."""
    out = {}
    d = vars(obj)
    for k, v in (d.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach() if torch.is_tensor(v) else v
    for k, v in (d.get("_buffers") or {}).items():
        if v is not None and k not in (d.get("_non_persistent_buffers_set") or ()):
            out[prefix + k] = v
    for k, v in (d.get("_modules") or {}).items():
        if v is not None:
            out.update(_state_dict(v, f"{prefix}{k}."))
    return out


def read_dalle_pickle(path: str | Path, expect: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``expect`` is "encoder" or "decoder" -> (state dict, attributes such as n_hid)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dall-e {expect} file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, expected a dall-e {expect} (torch.save of dall_e.{expect.title()})")
    try:
        with warnings.catch_warnings():  # legacy-format files warn that the classes' source is unavailable
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(path), map_location="cpu", pickle_module=_pickle_module(str(path)), weights_only=False)
    except DataError:
        raise
    except Exception as e:  # torch raises many types for a non-pickle / truncated file
        raise DataError(f"{path}: cannot be read as a torch.save file of a dall-e {expect} "
                        f"({type(e).__name__}: {e})") from None
    want, other = (_ENCODER, _DECODER) if expect == "encoder" else (_DECODER, _ENCODER)
    got = getattr(obj, "_qualname", None) or type(obj).__name__
    if got != want:
        hint = " (are --encoder and --decoder swapped?)" if got == other else ""
        raise DataError(f"{path}: holds a {got}, not a {want}{hint}")
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (int, bool, str))}
    return _state_dict(obj), attrs


def _group_shape(sd: dict[str, torch.Tensor], where: str) -> tuple[int, int]:
    groups = {k.split(".")[1] for k in sd if k.startswith("blocks.group_")}
    G = len(groups)
    blocks = {k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")}
    if G == 0 or not blocks:
        raise DataError(f"{where}: no blocks.group_N.block_M parameters; not a dall-e network")
    return G, len(blocks)


def config_from_dalle(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], enc_path: str, dec_path: str,
                      resolution: int) -> DVAEConfig:
    """Hyper-parameters from the weight shapes (the pickles do not store ``group_count``)."""
    try:
        G, B = _group_shape(enc, enc_path)
        Gd, Bd = _group_shape(dec, dec_path)
        n_hid = enc["blocks.input.w"].shape[0]
        vocab = enc["blocks.output.conv.w"].shape[0]
        in_ch = enc["blocks.input.w"].shape[1]
        dvocab = dec["blocks.input.w"].shape[1]
        n_init = dec["blocks.input.w"].shape[0]
        out_ch2 = dec["blocks.output.conv.w"].shape[0]
        dn_hid = dec["blocks.output.conv.w"].shape[1]
    except KeyError as e:
        raise DataError(f"{enc_path} / {dec_path}: missing parameter {e}; not a dall-e encoder/decoder pair") from None
    if vocab != dvocab:
        raise DataError(f"encoder {enc_path} has a vocabulary of {vocab} codes but decoder {dec_path} has "
                        f"{dvocab}; they are not a pair")
    if (G, B, n_hid) != (Gd, Bd, dn_hid):
        raise DataError(f"encoder {enc_path} (groups {G}, blocks/group {B}, n_hid {n_hid}) and decoder "
                        f"{dec_path} (groups {Gd}, blocks/group {Bd}, n_hid {dn_hid}) differ in shape; "
                        f"toto needs one n_hid/group layout for both")
    if out_ch2 % 2:
        raise DataError(f"{dec_path}: output conv has {out_ch2} maps, expected 2 per channel (logit-Laplace)")
    return DVAEConfig(vocab_size=vocab, n_hid=n_hid, n_blk_per_group=B, group_count=G, n_init=n_init,
                      input_channels=in_ch, output_channels=out_ch2 // 2, resolution=resolution).validate()


def convert_dalle(encoder_path: str | Path, decoder_path: str | Path, resolution: int = 128,
                  device: str = "cpu") -> DVAETokenizer:
    """The official pickles -> a ``DVAETokenizer`` (call ``.save(path)`` to write the safetensors file)."""
    enc, enc_attrs = read_dalle_pickle(encoder_path, "encoder")
    dec, dec_attrs = read_dalle_pickle(decoder_path, "decoder")
    cfg = config_from_dalle(enc, dec, str(encoder_path), str(decoder_path), resolution)
    for attrs, path in ((enc_attrs, encoder_path), (dec_attrs, decoder_path)):
        for k in ("vocab_size", "n_hid", "n_blk_per_group"):
            if k in attrs and attrs[k] != getattr(cfg, k):
                raise DataError(f"{path}: attribute {k}={attrs[k]} disagrees with its weights ({getattr(cfg, k)})")
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    load_state(encoder, enc, f"{encoder_path}")
    load_state(decoder, dec, f"{decoder_path}")
    return DVAETokenizer(cfg, encoder, decoder, device=device, source="converted from dall-e pickles")
