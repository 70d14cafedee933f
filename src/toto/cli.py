"""The `toto` command: one entry point, one module per subcommand under toto.commands.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int | None``.
Errors a user can fix (toto.errors.TotoError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

# Thread policy (docs/performance.md, "Threads"): idle OpenMP threads sleep instead of spinning,
# which costs little on free cores and avoids a 3-6x slow-down on a CPU shared with other jobs.
# It must be in the environment before torch loads; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .commands.argtypes import positive_int  # noqa: E402
from .errors import DataError, user_error  # noqa: E402
from .ioutil import dir_lock, file_lock  # noqa: E402

# subcommands, each the module of that name under toto.commands, in the order `toto --help` shows them
COMMANDS = ("quickstart", "tokenizer", "tokenize", "detokenize", "train", "probe", "lists", "finetune", "track",
            "forecast", "anticipate", "robot", "scaling", "synth", "cater", "coordcheck", "export", "params")


class Parser(argparse.ArgumentParser):
    """Every (sub)command's parser. A leaf command parses intermixed, so positionals (inputs,
    ``section.field=value`` overrides) may sit on either side of options
    (``toto train a.b=1 --out R c.d=2``); a parser with subcommands keeps argparse's rules."""

    subcommands = None  # the _SubParsersAction when this parser has subcommands
    _intermixing = False

    def add_subparsers(self, **kwargs):
        self.subcommands = super().add_subparsers(**kwargs)  # nested parsers get this class too
        return self.subcommands

    def parse_known_args(self, args=None, namespace=None):
        if self.subcommands is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args twice
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message):
        """One line, exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def leaves(self):
        """The parsers that run something (every command, every action of a grouped command)."""
        if self.subcommands is None:
            yield self
            return
        for child in dict.fromkeys(self.subcommands.choices.values()):
            yield from child.leaves()


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Options every runnable command takes, wherever they appear on the line."""
    options = (("--threads", dict(type=positive_int, default=None, metavar="N",
                                  help="torch CPU threads (default: see docs/performance.md, thread policy)")),
               ("--no-progress", dict(action="store_true", help="hide progress bars")))
    for flag, kwargs in options:
        try:
            p.add_argument(flag, **kwargs)
        except argparse.ArgumentError:  # the command defines it itself (same meaning)
            pass


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="toto", description="Autoregressive pre-training from videos.")
    parser.add_argument("--version", action="version", version=f"toto {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = importlib.import_module(f"toto.commands.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _locks_out=getattr(mod, "LOCKS_OUT", False))
    for leaf in parser.leaves():
        add_common_arguments(leaf)
    return parser


def set_threads(n: int | None) -> None:
    if n is None:
        return
    import torch

    torch.set_num_threads(n)


def output_lock(args):
    """The lock a writing job holds on its ``--out`` while it runs, so two jobs never write one
    output (docs/training.md, "Run folders: one run, one writer"). A command module, or one
    action of a grouped command (``set_defaults(_locks_out=...)``), declares ``LOCKS_OUT``:
    True when ``--out`` is a folder, "file" when it is one file (refused at once when it names
    a folder, not at the end of a long job). train, tokenize, detokenize and export, whose
    output is not simply ``--out``, take the same lock themselves. A dry run writes nothing;
    under torchrun only rank 0 writes, so only rank 0 takes it."""
    kind = getattr(args, "_locks_out", False)
    if not kind or getattr(args, "dry_run", False) or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    if kind == "file" and os.path.isdir(args.out):
        raise DataError(f"{args.out}: is a folder (a file name is expected here)")
    return (file_lock if kind == "file" else dir_lock)(args.out, f"toto {args.command}")


def _leave_process_group() -> None:
    """Under torchrun: every rank waits for the others to finish, then leaves the group, so no
    rank exits while another still talks to it (gloo aborts a rank whose peer vanished)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line usage error: a code, as for the rest
        return int(e.code or 0)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        set_threads(args.threads)
        with output_lock(args):
            code = args._run(args)
            _leave_process_group()
        sys.stdout.flush()  # a closed pipe (`| head`) surfaces here, not at interpreter exit
    except KeyboardInterrupt as e:
        print(f"toto {args.command}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 143 if "SIGTERM" in str(e) else 130
    except BrokenPipeError:
        # the reader (`| head`) has what it wanted: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 - errors a user can fix become one line; bugs keep their traceback
        message = user_error(e)
        if message is None:
            raise
        print(f"toto {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
