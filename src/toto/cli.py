"""The `toto` command: one entry point, one module per subcommand under toto.commands.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int | None``.
Errors a user can fix (toto.errors.TotoError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ConfigError, TotoError

# subcommand -> module under toto.commands (listed in the order `toto --help` shows them)
COMMANDS = {
    "quickstart": "quickstart",
    "tokenizer": "tokenizer",
    "tokenize": "tokenize",
    "detokenize": "detokenize",
    "train": "train",
    "probe": "probe",
    "lists": "lists",
    "finetune": "finetune",
    "track": "track",
    "forecast": "forecast",
    "anticipate": "anticipate",
    "robot": "robot",
    "scaling": "scaling",
    "synth": "synth",
    "cater": "cater",
    "coordcheck": "coordcheck",
    "export": "export",
    "params": "params",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="toto", description="Autoregressive pre-training from videos.")
    parser.add_argument("--version", action="version", version=f"toto {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod_name in COMMANDS.items():
        try:
            mod = importlib.import_module(f"toto.commands.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name != f"toto.commands.{mod_name}":
                raise
            continue  # not built yet; the README lists what exists
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads (default: torch's, one per core); on a CPU shared with other "
                            "jobs 1 is often much faster, since small kernels stall on descheduled threads")
        p.set_defaults(_run=mod.run)
    return parser


def set_threads(n: int | None) -> None:
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        set_threads(args.threads)
        code = args._run(args)
    except TotoError as e:
        print(f"toto {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"toto {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
