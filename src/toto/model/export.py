"""Conversion between toto checkpoints and Hugging Face ``LlamaForCausalLM`` folders.

The HF folder holds ``config.json`` (a LlamaConfig), ``model.safetensors`` with HF parameter
names, and ``toto.json`` (our vocabulary layout and where the weights came from), so the
exported model loads with ``LlamaForCausalLM.from_pretrained(OUT_DIR)`` and nothing of ours.

Name mapping, per layer ``i`` (``D = dim``, ``F = ffn_dim``)::

    layers.i.attn.wqkv.weight (3D, D)   -> self_attn.{q,k,v}_proj.weight, rows [0:D, D:2D, 2D:3D]
    layers.i.attn.wo.weight             -> self_attn.o_proj.weight
    layers.i.mlp.w13.weight   (2F, D)   -> mlp.{gate,up}_proj.weight, rows [0:F, F:2F]
    layers.i.mlp.w2.weight              -> mlp.down_proj.weight
    layers.i.attn_norm / mlp_norm       -> input_layernorm / post_attention_layernorm
    tok_emb / norm / head               -> model.embed_tokens / model.norm / lm_head

q and k rows are copied as they are: our RoPE pairs dimension ``j`` with ``j + head_dim/2``
("rotate half"), which is HF's layout (tests/test_export.py checks the logits agree).

Two muP-only scalings have no LlamaConfig field and are folded into weights instead: an
attention scale ``s`` other than ``1/sqrt(head_dim)`` multiplies q rows by ``s*sqrt(head_dim)``
(RoPE is linear, so scores scale the same), and a logit scale multiplies the output head (which
is then written untied, since the embedding must stay as it is).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from ..errors import CheckpointError
from ..ioutil import atomic_dir, atomic_write_json

HF_LAYER = "model.layers.{i}."


def _attn_q_factor(model) -> float:
    """Factor that turns HF's ``1/sqrt(head_dim)`` score scale into the model's own."""
    scale = model.layers[0].attn.scale
    if scale is None:
        return 1.0
    return scale * math.sqrt(model.cfg.head_dim)


def hf_config(cfg: ModelConfig, tie: bool, eos: int | None = None, bos: int | None = None) -> dict:
    """LlamaConfig fields for ``cfg`` (multi-head attention: kv heads = heads; no biases)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta; 5.x reads rope_parameters (and accepts both)
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def to_hf_state_dict(model) -> tuple[dict[str, torch.Tensor], bool]:
    """(HF-named tensors, tie_word_embeddings) for a ``toto.model.llama.Toto``."""
    cfg: ModelConfig = model.cfg
    D, F = cfg.dim, cfg.ffn_dim
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    q_factor = _attn_q_factor(model)
    logit_scale = float(getattr(model, "logit_scale", 1.0))
    tie = bool(cfg.tie_embeddings) and logit_scale == 1.0
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not tie:
        out["lm_head.weight"] = sd["tok_emb.weight" if cfg.tie_embeddings else "head.weight"] * logit_scale
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", HF_LAYER.format(i=i)
        wqkv, w13 = sd[src + "attn.wqkv.weight"], sd[src + "mlp.w13.weight"]
        out[dst + "self_attn.q_proj.weight"] = wqkv[:D] * q_factor
        out[dst + "self_attn.k_proj.weight"] = wqkv[D:2 * D]
        out[dst + "self_attn.v_proj.weight"] = wqkv[2 * D:]
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.wo.weight"]
        out[dst + "mlp.gate_proj.weight"] = w13[:F]
        out[dst + "mlp.up_proj.weight"] = w13[F:]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.w2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "mlp_norm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}, tie


def model_config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a LlamaConfig dict; refuses what our model cannot represent."""
    try:
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        kv = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or dim // heads)
        rope = hf.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        cfg = ModelConfig(n_layers=int(hf["num_hidden_layers"]), n_heads=heads, dim=dim,
                          ffn_dim=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
                          max_seq_len=int(hf["max_position_embeddings"]), rope_base=theta,
                          norm_eps=float(hf["rms_norm_eps"]),
                          tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: not a usable LlamaConfig ({e!r})") from None
    problems = []
    if kv != heads:
        problems.append(f"grouped-query attention ({kv} kv heads for {heads} heads)")
    if head_dim * heads != dim:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {dim}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        problems.append("biases")
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        problems.append(f"RoPE scaling {scaling}")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {hf['hidden_act']!r}")
    if problems:
        raise CheckpointError(f"{where}: toto's model has no {', '.join(problems)}")
    return cfg


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_state_dict`` (without muP folding): HF names -> our names."""
    def get(name):
        if name not in tensors:
            raise CheckpointError(f"HF weights lack {name!r}")
        return tensors[name]

    out = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        out["head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = HF_LAYER.format(i=i), f"layers.{i}."
        out[dst + "attn.wqkv.weight"] = torch.cat([get(src + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[dst + "attn.wo.weight"] = get(src + "self_attn.o_proj.weight")
        out[dst + "mlp.w13.weight"] = torch.cat([get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")])
        out[dst + "mlp.w2.weight"] = get(src + "mlp.down_proj.weight")
        out[dst + "attn_norm.weight"] = get(src + "input_layernorm.weight")
        out[dst + "mlp_norm.weight"] = get(src + "post_attention_layernorm.weight")
    return out


def save_hf(model, out_dir: str | Path, extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an HF Llama folder, atomically (``OUT_DIR.tmp`` then rename)."""
    out = Path(out_dir)
    if out.exists() and not (out / "toto.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an earlier toto export; refusing to replace it "
                              f"(pass a new or empty folder)")
    tensors, tie = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    extra = extra or {}
    vocab = extra.get("vocab") or {}
    cfg = hf_config(model.cfg, tie, eos=vocab.get("end"), bos=None)
    name = str(dtype or next(iter(tensors.values())).dtype).removeprefix("torch.")
    cfg["torch_dtype"] = cfg["dtype"] = name
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", cfg)
        atomic_write_json(tmp / "toto.json", {"exported_from": "toto", **extra})
    return out


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """A toto run or checkpoint folder -> an HF Llama folder at ``out_dir``."""
    from ..train.checkpoint import load_model

    model, cfg, state = load_model(checkpoint)
    extra = {"checkpoint": state["path"], "step": state.get("step"), "vocab": state.get("vocab"),
             "tokenizer": state.get("tokenizer"), "grid": state.get("grid"),
             "frames_per_sequence": state.get("frames_per_sequence")}
    return save_hf(model, out_dir, {k: v for k, v in extra.items() if v is not None}, dtype)


def load_hf(path: str | Path):
    """A ``Toto`` model from an HF Llama folder (ours or any plain multi-head Llama)."""
    from .llama import Toto
    from ..train.checkpoint import load_weights

    p = Path(path)
    cfg_file, weights = p / "config.json", p / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{p}: expected config.json and model.safetensors (sharded HF "
                              f"checkpoints are not supported)")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = model_config_from_hf(hf, str(cfg_file))
    model = Toto(cfg)
    tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
    load_weights(model, from_hf_state_dict(tensors, cfg), str(weights))
    return model.eval()
