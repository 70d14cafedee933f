"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

    <run>/checkpoints/step_00000100/
        model.safetensors       weights
        optimizer.safetensors   AdamW moments and step counts, keyed "<parameter name>::<field>"
        optimizer.json          optimizer param groups (lr, betas, ...)
        config.json             the full run config (toto.config.Config)
        state.json              step, tokens seen, loader position, vocab layout, ...
    <run>/checkpoints/latest    name of the newest complete checkpoint

A checkpoint folder is written under ``<name>.tmp`` and renamed when complete; ``latest`` is
updated afterwards, so a kill at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, config_from_dict
from ..errors import CheckpointError
from ..ioutil import (atomic_dir, atomic_write_bytes, atomic_write_json, load_tensors, read_json, verify_checksums,
                      write_checksums)

CKPT_DIR = "checkpoints"


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
    """Full (unsharded) model and optimizer state keyed by parameter name, on CPU.

    A collective under FSDP: every rank must call it; the tensors are complete on rank 0.
    Keying the optimizer by name (not position) is what lets any world size load it.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def _model_tensors(msd: dict, tied: bool) -> dict[str, torch.Tensor]:
    if tied:
        msd = {k: v for k, v in msd.items() if k != "head.weight"}  # alias of tok_emb.weight
    return {k: v.detach().contiguous().cpu() for k, v in msd.items()}


def optimizer_to_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict (keyed by parameter name, or by index for a plain
    ``opt.state_dict()``) -> safetensors-ready ``"<key>::<field>"`` tensors + JSON groups."""
    tensors = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{name}::{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": osd["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str | int, dict] = {}
    for key, t in tensors.items():
        name, k = key.rsplit("::", 1)
        state.setdefault(int(name) if name.isdigit() else name, {})[k] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, model_state, config: Config, state: dict,
                    optimizer_state: dict | None = None, keep: int = 3,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write one checkpoint folder atomically (call on one rank only). ``model_state`` is a
    full state dict (see ``gather_state``) or, for a single-process model, the module itself.
    ``extra_tensors`` adds ``<name>.safetensors`` files to the same folder (e.g. a fine-tuned
    probe head), written before the folder is renamed into place."""
    if isinstance(model_state, torch.nn.Module):
        model_state = model_state.state_dict()
    root = Path(run_dir) / CKPT_DIR
    name = f"step_{step:08d}"
    with atomic_dir(root / name) as tmp:
        save_file(_model_tensors(model_state, config.model.tie_embeddings), str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            tensors, meta = optimizer_to_tensors(optimizer_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            atomic_write_json(tmp / "optimizer.json", meta)
        for extra, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(tmp / f"{extra}.safetensors"))
        atomic_write_json(tmp / "config.json", config.to_dict())
        atomic_write_json(tmp / "state.json", {"step": step, **state})
        write_checksums(tmp)
    atomic_write_bytes(root / "latest", name.encode())
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)
    return root / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        p = root / name
        if Path(name).name != name or not name.startswith("step_") or p.resolve().parent != root.resolve():
            raise CheckpointError(f"{pointer} points to {name!r}, not to a checkpoint of this run "
                                  f"({root}/step_*); fix or delete it")
        if (p / "state.json").is_file():
            return p
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint folder or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint found at {path} (expected a run folder or a "
                              f"checkpoints/step_* folder with model.safetensors)")
    return found


def read_config(path: str | Path) -> Config:
    """The run config saved with a checkpoint (a checkpoint folder or a run folder)."""
    p = resolve_checkpoint(path) / "config.json"
    return config_from_dict(read_json(p))


def read_checkpoint(path: str | Path) -> tuple[Config, dict, dict[str, torch.Tensor]]:
    """(config, state, model tensors) of a checkpoint folder or run folder."""
    p = resolve_checkpoint(path)
    verify_checksums(p, ["model.safetensors"])  # tensors only: JSON is parsed and checked, and users may edit it
    try:
        cfg = config_from_dict(json.loads((p / "config.json").read_text()))
        state = json.loads((p / "state.json").read_text())
        tensors = load_file(str(p / "model.safetensors"))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {p} is incomplete or corrupt: {e}") from None
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        raise CheckpointError(f"checkpoint {p}: cannot read weights ({e})") from None
    return cfg, {**state, "path": str(p)}, tensors


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load full weights into a plain, DDP-wrapped or FSDP-sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if model.cfg.tie_embeddings and "tok_emb.weight" in tensors:
        tensors = {**tensors, "head.weight": tensors["tok_emb.weight"]}
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    # DTensor.shape is the global (unsharded) shape, so this also checks FSDP2 models
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise CheckpointError(f"{where}: tensor shapes differ from the model's for {bad[:5]} "
                              f"(e.g. {bad[0]}: {tuple(tensors[bad[0]].shape)} vs {shapes[bad[0]]})")
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    f = path / "optimizer.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{path}: optimizer state missing; cannot resume training exactly")
    verify_checksums(path, ["optimizer.safetensors"])
    meta = read_json(path / "optimizer.json")
    osd = optimizer_from_tensors(load_tensors(f), meta)
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A frozen-ready model and its config from a checkpoint (for evaluation and generation)."""
    from ..model.llama import Toto

    cfg, state, tensors = read_checkpoint(path)
    model = Toto(cfg.model)
    load_weights(model, tensors, state["path"])
    return model.to(device).eval(), cfg, state
