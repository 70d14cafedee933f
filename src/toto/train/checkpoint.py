"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

    <run>/checkpoints/step_00000100/
        model.safetensors       weights
        optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
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
from ..ioutil import atomic_replace_dir, atomic_write_bytes, atomic_write_json

CKPT_DIR = "checkpoints"


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("head.weight", None)  # shared with tok_emb.weight; safetensors refuses aliases
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"{pid}.{k}"] = t.detach().contiguous().cpu()
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, config: Config,
                    state: dict, optimizer: torch.optim.Optimizer | None = None, keep: int = 3) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_model_tensors(model), str(tmp / "model.safetensors"))
    if optimizer is not None:
        tensors, meta = optimizer_to_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "optimizer.json", meta)
    atomic_write_json(tmp / "config.json", config.to_dict())
    atomic_write_json(tmp / "state.json", {"step": step, **state})
    atomic_replace_dir(tmp, root / name)
    atomic_write_bytes(root / "latest", name.encode())
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)
    return root / name


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
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


def read_checkpoint(path: str | Path) -> tuple[Config, dict, dict[str, torch.Tensor]]:
    """(config, state, model tensors) of a checkpoint folder or run folder."""
    p = resolve_checkpoint(path)
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
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if getattr(model.cfg, "tie_embeddings", False):
        missing = [m for m in missing if m != "head.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    f = path / "optimizer.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{path}: optimizer state missing; cannot resume training exactly")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_from_tensors(load_file(str(f)), meta))


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A frozen-ready model and its config from a checkpoint (for evaluation and generation)."""
    from ..model.llama import Toto

    cfg, state, tensors = read_checkpoint(path)
    model = Toto(cfg.model)
    load_weights(model, tensors, state["path"])
    return model.to(device).eval(), cfg, state
