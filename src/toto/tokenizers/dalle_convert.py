"""Read OpenAI's ``encoder.pkl`` / ``decoder.pkl`` without the ``dall-e`` package or arbitrary code.

The official files are whole modules saved with ``torch.save`` (pickles of ``dall_e.Encoder`` /
``dall_e.Decoder`` objects).  Loading them normally imports the package and lets the pickle call
any function.  Here ``torch.load`` runs with a restricted unpickler instead: the only callables
it will resolve are torch's tensor/parameter rebuild functions, storage types, ``torch.device``,
``OrderedDict`` and ``set``; every ``dall_e.*`` and ``torch.nn.*`` class becomes a plain
holder that just keeps its attribute dict (``safe_pickle``).  Anything else in the pickle is refused.  From the
holders we read the parameters under their module paths (``blocks.group_1.block_1...``) and the
hyper-parameters from the weight shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError
from .dvae import DVAEConfig, Decoder, DVAETokenizer, Encoder, load_state
from .safe_pickle import holder_state_dict, restricted_load

_ENCODER, _DECODER = "dall_e.encoder.Encoder", "dall_e.decoder.Decoder"


def read_dalle_pickle(path: str | Path, expect: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``expect`` is "encoder" or "decoder" -> (state dict, attributes such as n_hid)."""
    obj = restricted_load(path, f"dall-e {expect}",
                          inert=("dall_e.", "torch.nn.modules."),
                          hint="a dall-e encoder/decoder file holds only dall_e and torch.nn modules and tensors")
    want, other = (_ENCODER, _DECODER) if expect == "encoder" else (_DECODER, _ENCODER)
    got = getattr(obj, "qualname", None) or type(obj).__name__
    if got != want:
        hint = " (are --encoder and --decoder swapped?)" if got == other else ""
        raise DataError(f"{path}: holds a {got}, not a {want}{hint}")
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and isinstance(v, (int, bool, str))}
    return holder_state_dict(obj), attrs


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
