"""Argument groups shared by several subcommands."""

from __future__ import annotations

import argparse

from ..config import PRESETS, Config, build_config


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    p.add_argument("--preset", choices=list(PRESETS), default=default_preset,
                   help="named preset to start from (tiny runs on a CPU in seconds)")
    p.add_argument("--config", metavar="YAML", help="YAML file with model/data/train sections (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="overrides applied last, e.g. train.lr=1e-3 model.n_layers=6")


def config_from_args(args) -> Config:
    return build_config(args.preset, args.config, args.overrides)
