"""Argument groups shared by several subcommands, each written once.

``--threads`` and ``--no-progress`` are added to every command by toto.cli. A job's own settings
are the fields of its dataclass declared with ``toto.config.option``: ``add_options`` turns them
into flags, and ``job_config`` builds the dataclass from defaults, ``--config`` YAML,
``section.field=value`` overrides and the flags given, through toto.config.build_section.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..config import DEVICE_HELP, PRESETS, Config, build_config, build_section, coerce_field
from ..errors import ConfigError
from .argtypes import positive_int


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default=default_preset,
                   help="named preset to start from (tiny runs on a CPU in seconds)")
    p.add_argument("--config", metavar="YAML", help="YAML file with model/data/train sections (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied last, e.g. train.lr=1e-3 model.n_layers=6")


def config_from_args(args) -> Config:
    return build_config(args.preset, args.config, args.overrides)


# --- shared groups --------------------------------------------------------------------------------

def add_model_source(p, required: bool = True, what: str = "") -> None:
    """--checkpoint and --tokenizer: the pre-trained model a job reads."""
    p.add_argument("--checkpoint", required=required, metavar="RUN_OR_CKPT",
                   help=f"run folder (its latest checkpoint) or checkpoint folder{what}")
    p.add_argument("--tokenizer", required=required, metavar="FILE", help="tokenizer file the model was trained with")


def add_labelled_data(p, help: str = "dataset root with train/ and val/ class folders (or train.txt/val.txt)") -> None:
    p.add_argument("--data", required=True, help=help)
    p.add_argument("--max-per-class", type=positive_int, help="use at most this many samples per class and split")


def add_clips(p, frames: int = 16, stride: int = 4, clip: bool = True, frames_help: str = "",
              stride_help: str = "") -> None:
    """--frames, --stride (and --clip): how a video becomes one sequence."""
    p.add_argument("--frames", type=positive_int, default=frames,
                   help=frames_help or f"frames per video sequence (default {frames}, as in pre-training)")
    p.add_argument("--stride", type=positive_int, default=stride,
                   help=stride_help or f"keep one video frame in STRIDE (default {stride})")
    if clip:
        p.add_argument("--clip", choices=("center", "first", "last"), default="center",
                       help="which FRAMES-frame window of a longer video (default center, the usual single-clip "
                            "test; last: the one ending at the last frame, for CATER)")


def add_device(p, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"{DEVICE_HELP} (default {default})")


# --- one job's settings, declared once on its dataclass -------------------------------------------

def _dest(section: str, name: str) -> str:
    return f"{section}.{name}"


def _parser(cls, name: str, where: str):
    def parse(text: str):
        try:
            return coerce_field(cls, name, text, where)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{where}: ")) from None

    parse.__name__ = name
    return parse


def add_options(p, cls, section: str, only: tuple[str, ...] | None = None, title: str | None = None) -> None:
    """One flag per field of ``cls`` declared with ``toto.config.option`` (or the ``only`` ones).
    A flag not given leaves the field to the YAML file, the overrides and the default."""
    g = p.add_argument_group(title or f"{section} settings")
    for f in dataclasses.fields(cls):
        md = f.metadata
        if "help" not in md or (only is not None and f.name not in only):
            continue
        default = f.default
        kw = dict(dest=_dest(section, f.name), default=argparse.SUPPRESS)
        flag = md.get("flag") or ("--no-" if default is True else "--") + f.name.replace("_", "-")
        if isinstance(default, bool):
            kw["action"] = "store_false" if default else "store_true"
            help = md["help"]
        else:
            kw["type"] = _parser(cls, f.name, flag)
            kw["metavar"] = md.get("metavar", None if "choices" in md else flag[2:].replace("-", "_").upper())
            if "choices" in md:
                kw["choices"] = md["choices"]
            help = md["help"] if default is None or "default" in md["help"] else f"{md['help']} (default {default})".lstrip()
        g.add_argument(flag, help=help, **kw)


def add_job_config(p, section: str) -> None:
    """--config YAML and positional ``section.field=value`` overrides for a job's settings."""
    p.add_argument("--config", metavar="YAML", help=f"YAML file with a {section}: mapping of settings")
    p.add_argument("overrides", nargs="*", metavar=f"{section}.field=value",
                   help=f"settings overrides (before the flags' values), e.g. {section}.seed=1")


def job_config(cls, section: str, args, **shared):
    """The job's ``cls`` from defaults, --config, overrides and the flags given (``shared``: fields
    set from the command's own flags, e.g. a size two tokenizer kinds share); validated."""
    prefix = section + "."
    given = {**shared, **{k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}}
    return build_section(cls, section, getattr(args, "config", None), getattr(args, "overrides", None), given)
