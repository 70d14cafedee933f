"""Dataclass configs, named presets, YAML files and `section.field=value` overrides.

All three routes (preset, YAML, command line) land on the same dataclasses, and ``validate``
names the offending field for any impossible value. A job's settings (probe, finetune, forecast,
...) are one dataclass each, built by ``build_section`` through the same code: fields declared
with ``option`` are also that command's flags (toto.commands.common.add_options).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .ioutil import read_text


DEVICE_HELP = "auto | cpu | cuda | cuda:N"


def option(default: Any = None, help: str = "", **cli) -> Any:
    """A dataclass field that is also a command-line option, so it is written once: ``help`` is its
    --help text; ``cli`` may name the flag (``flag="--probe-batch-size"``) or give an argparse
    ``type`` (checked on the command line, in YAML files and in overrides alike), ``choices`` or
    ``metavar``. A bool field is a switch: ``--name`` when it defaults to False, ``flag`` (default
    ``--no-name``) when it defaults to True."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class ModelConfig:
    """LLaMA-style decoder. ``vocab_size``/``max_seq_len`` left as None are taken from the data."""

    n_layers: int = 12
    n_heads: int = 12
    dim: int = 768
    ffn_dim: int = 3072  # SwiGLU hidden width; presets pick it so counts match the paper (arXiv 2501.05453)
    vocab_size: int | None = 8196  # 8192 dVAE codes + 4 specials (see toto.vocab)
    max_seq_len: int | None = 4098  # 16 frames x 256 tokens + start + end
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    mup_base_dim: int | None = None  # muP: width the hyper-parameters were tuned at (None: off)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    path: str | list[str] | None = None  # folder(s) with index.json + shard files; "a,b" = [a, b]
    weights: list[float] | None = None  # per-folder mixing weights (None: by sequence count)
    val_fraction: float = 0.005
    val_max_sequences: int = 512  # cap on the held-out split so validation stays cheap
    seed: int = 0


@dataclass
class TrainConfig:
    out_dir: str = "runs/toto"
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 2000
    max_steps: int = 100_000
    batch_tokens: int = 2**20  # tokens per optimizer step (1M as in the paper)
    micro_batch_size: int = 8  # sequences per forward pass; gradient accumulation fills the rest
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 500
    eval_batches: int = 20
    ckpt_interval: int = 1000
    keep_checkpoints: int = 3
    log_interval: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard per block); used under torchrun
    compile: bool = False
    activation_checkpointing: bool = False
    tensorboard: bool = True
    seed: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named presets: overrides applied on top of the defaults.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(n_layers=4, n_heads=4, dim=128, ffn_dim=512, vocab_size=None, max_seq_len=None),
        "data": dict(val_fraction=0.1, val_max_sequences=64),
        "train": dict(lr=2e-3, warmup_steps=20, max_steps=200, batch_tokens=8192,
                      micro_batch_size=8, eval_interval=50, eval_batches=4, ckpt_interval=50,
                      log_interval=5, weight_decay=0.05),
    },
    # paper-scale presets compile: 1.85x the tokens/s of eager training on an H200 (docs/performance.md);
    # where compiling fails (no C++ compiler for inductor, say) the trainer falls back to eager
    "base": {"model": dict(n_layers=12, n_heads=12, dim=768, ffn_dim=3072), "train": dict(compile=True)},
    "large": {"model": dict(n_layers=16, n_heads=16, dim=1024, ffn_dim=4096), "train": dict(compile=True)},
    "1b": {"model": dict(n_layers=22, n_heads=16, dim=2048, ffn_dim=5632), "train": dict(compile=True)},
}


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert YAML/CLI values to the annotated type, or raise naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        lists = [a for a in args if typing.get_origin(a) is list]
        return _coerce(value, lists[0] if lists and isinstance(value, (list, tuple)) else args[0], where)
    if origin is list:  # a YAML list, or a comma-separated string from the command line
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            items = [items]
        (elem,) = typing.get_args(tp)
        return [_coerce(v.strip() if isinstance(v, str) else v, elem, f"{where}[{i}]")
                for i, v in enumerate(items)]
    if value is None:
        raise ConfigError(f"{where}: must not be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def coerce_field(cls, name: str, value: Any, where: str) -> Any:
    """``value`` (YAML, override or command-line text) as field ``name`` of ``cls`` holds it, checked
    by the field's ``option`` type if it has one; a ConfigError naming ``where`` otherwise."""
    value = _coerce(value, _field_type(cls, name), where)
    check = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("type")
    if check is not None and value is not None:
        try:
            value = check(str(value))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return value


def set_fields(obj, section: str, values: dict, source: str) -> None:
    """Set fields of the dataclass ``obj`` (named ``section`` in messages) from a mapping."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping")
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown field {section}.{key} (known: {', '.join(sorted(names))})")
        setattr(obj, key, coerce_field(type(obj), key, value, f"{section}.{key}"))


def _apply(cfg: Config, section: str, values: dict, source: str) -> None:
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        raise ConfigError(f"{source}: unknown config section {section!r} (expected model, data or train)")
    set_fields(sub, section, values, source)


def apply_dict(cfg: Config, d: dict, source: str = "config") -> Config:
    for section, values in d.items():
        if section == "preset":
            continue
        _apply(cfg, section, values, source)
    return cfg


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    return apply_dict(Config(), PRESETS[name], f"preset {name}")


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML file whose top level is a mapping, or a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        d = yaml.safe_load(read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping with {expected}")
    return d


def load_yaml(path: str | Path, cfg: Config | None = None) -> Config:
    d = read_yaml_mapping(path, "config file", "model/data/train sections")
    if cfg is None:
        cfg = preset(d["preset"]) if "preset" in d else Config()
    return apply_dict(cfg, d, str(path))


def parse_override(item: str, example: str = "train.lr=1e-3") -> tuple[str, str, Any]:
    """``section.field=value`` -> (section, field, value parsed as a YAML scalar)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.field=value, e.g. {example}")
    key, raw = item.split("=", 1)
    section, name = key.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return section, name, value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.field=value`` strings (values parsed as YAML scalars)."""
    for item in overrides:
        section, name, value = parse_override(item)
        _apply(cfg, section, {name: value}, "command line")
    return cfg


def build_section(cls, section: str, yaml_path: str | None = None, overrides: list[str] | None = None,
                  given: dict | None = None):
    """A job's settings, the one dataclass ``cls``: its defaults, then the ``section:`` mapping of
    the YAML file, then ``section.field=value`` overrides, then the options given on the command
    line (``given``, already parsed); validated with the dataclass's own ``validate``."""
    obj = cls()
    if yaml_path:
        d = read_yaml_mapping(yaml_path, "config file", f"a {section}: section")
        for name in d:
            if name != section:
                raise ConfigError(f"{yaml_path}: unknown config section {name!r} (expected {section})")
        set_fields(obj, section, d.get(section) or {}, yaml_path)
    for item in overrides or []:
        name, key, value = parse_override(item, f"{section}.seed=1")
        if name != section:
            raise ConfigError(f"override {item!r}: unknown config section {name!r} (expected {section})")
        set_fields(obj, section, {key: value}, "command line")
    for key, value in (given or {}).items():
        setattr(obj, key, value)
    obj.validate()
    return obj


def build_config(preset_name: str | None = None, yaml_path: str | None = None,
                 overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Preset, then YAML, then command-line overrides; validated. With ``base`` (a resumed
    run's saved config) they are applied on top of it, so only what the user names changes."""
    if base is not None:
        cfg = copy.deepcopy(base)
        if preset_name:
            preset(preset_name)  # an unknown name is refused there
            apply_dict(cfg, PRESETS[preset_name], f"preset {preset_name}")
        if yaml_path:
            apply_dict(cfg, read_yaml_mapping(yaml_path, "config file", "model/data/train sections"), yaml_path)
        apply_overrides(cfg, overrides or [])
        return validate(cfg)
    cfg = preset(preset_name) if preset_name else None
    if yaml_path:
        cfg = load_yaml(yaml_path, cfg)  # a YAML `preset:` key applies when --preset is not given
    cfg = cfg or Config()
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def data_paths(d: DataConfig) -> list[str]:
    """``data.path`` as a list of folders (a comma-separated string counts as several)."""
    if not d.path:
        return []
    items = d.path.split(",") if isinstance(d.path, str) else d.path
    return [p.strip() for p in items if p.strip()]


def _positive(obj, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and not v > 0:
            raise ConfigError(f"{section}.{n} must be > 0, got {v}")


def validate_model(m: ModelConfig) -> None:
    _positive(m, "model", "n_layers", "n_heads", "dim", "ffn_dim", "vocab_size", "max_seq_len",
              "rope_base", "norm_eps", "init_std", "mup_base_dim")
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"model.dim / model.n_heads = {m.head_dim} must be even for rotary embeddings")


def validate(cfg: Config) -> Config:
    validate_model(cfg.model)
    d, t = cfg.data, cfg.train
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.weights is not None:
        paths = data_paths(d)
        if paths and len(d.weights) != len(paths):
            raise ConfigError(f"data.weights has {len(d.weights)} value(s) but data.path names "
                              f"{len(paths)} folder(s): give one weight per folder")
        bad = [w for w in d.weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ConfigError(f"data.weights must all be finite and > 0, got {d.weights}")
    _positive(t, "train", "lr", "max_steps", "batch_tokens", "micro_batch_size", "eval_interval",
              "eval_batches", "ckpt_interval", "keep_checkpoints", "log_interval")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    for n in ("beta1", "beta2"):
        if not 0 <= getattr(t, n) < 1:
            raise ConfigError(f"train.{n} must be in [0, 1), got {getattr(t, n)}")
    if t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("train.weight_decay and train.grad_clip must be >= 0")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype must be auto, fp32 or bf16, got {t.dtype!r}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if not math.isfinite(t.lr):
        raise ConfigError(f"train.lr must be finite, got {t.lr}")
    return cfg


def config_from_dict(d: dict) -> Config:
    """Rebuild a config saved with ``Config.to_dict`` (checkpoints)."""
    return validate(apply_dict(Config(), d, "saved config"))
