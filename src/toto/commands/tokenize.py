"""`toto tokenize`: videos and images -> token shards (resumable, parallel decoding; split across
processes and machines with `--part i/n` or torchrun, see `toto.data.build`)."""

from __future__ import annotations

import logging
import os

from .argtypes import nonnegative_int, positive_int
from .common import add_clips


def part_spec(text: str) -> tuple[int, int]:
    import argparse

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"expected 0 <= I < N, got {text}")
    return i, n


def torchrun_part() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))

HELP = "turn folders / list files of videos and images into token shards"


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="folders (searched recursively), media files, or list files (.txt/.lst, one path a line)")
    p.add_argument("--tokenizer", required=True, metavar="FILE", help="tokenizer file (dVAE or patch safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="output shard folder")
    add_clips(p, clip=False, frames_help="frames per video sequence and images per image sequence (default 16)")
    p.add_argument("--short", choices=("pad", "skip"), default="pad",
                   help="videos shorter than one sequence: pad by repeating the last frame, or skip")
    p.add_argument("--workers", type=nonnegative_int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="decoding processes (0: decode in the main process)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="sequences per shard file (default 1024)")
    p.add_argument("--batch-frames", type=positive_int, default=64, help="frames per tokenizer call (default 64)")
    p.add_argument("--device", default=None, help="tokenizer device (default: cuda when available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="dVAE on CUDA: convolution precision (default fp16, as the dall-e reference); "
                        "the CPU always runs the exact fp32 encoder")
    p.add_argument("--compile", action="store_true", help="dVAE on CUDA: torch.compile the encoder")
    p.add_argument("--part", type=part_spec, default=None, metavar="I/N",
                   help="tokenize only part I (0-based) of N, for N independent processes (e.g. a Slurm array); "
                        "the one that completes the last part merges them into --out. Under torchrun "
                        "(`torchrun --nproc_per_node=N -m toto.tokenize ...`) each rank takes part RANK/WORLD_SIZE")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace existing shards in --out")


def run(args) -> int:
    from ..data.build import SUMMARY, BuildOptions, build_shards, format_summary
    from ..device import resolve_device
    from ..errors import ConfigError
    from ..tokenizers.base import get_tokenizer

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device or "auto"))
    part, ranks = args.part, torchrun_part()
    if ranks is not None:
        if part is not None:
            raise ConfigError("--part and torchrun both split the inputs; use one of them")
        part = ranks[:2]
        if device == "cuda":  # one rank per GPU
            device = f"cuda:{ranks[2]}"
    tok = get_tokenizer(args.tokenizer, device=device)
    if args.precision or args.compile:
        from ..tokenizers.dvae import DVAETokenizer

        if not isinstance(tok, DVAETokenizer):
            raise ConfigError(f"--precision/--compile apply to dVAE tokenizers; {args.tokenizer} is a "
                              f"{tok.kind} tokenizer")
        tok.set_speed(args.precision, args.compile)
    opts = BuildOptions(frames=args.frames, stride=args.stride, short=args.short, workers=args.workers,
                        shard_size=args.shard_size, batch_frames=args.batch_frames, resume=args.resume,
                        overwrite=args.overwrite, progress=not args.no_progress)
    s = build_shards(args.inputs, tok, args.out, opts, part=part)
    if s["already_complete"]:
        print(f"{args.out} was already complete; nothing to do")
    if part is not None and not s["already_complete"]:
        mine = s.get("this_part", s)
        print(f"part {part[0]}/{part[1]}: {mine['sequences_written_this_run']} sequences written this run"
              f"{' (resumed)' if mine['resumed'] else ''}, {mine['sequences']} in the part")
    if "waiting_for" in s:
        i, n = part
        print(f"part {i}/{n} is complete ({s['sequences']} sequences); {args.out} will be written by the process "
              f"that completes the last of the parts still missing: {s['waiting_for']}")
        return 0
    print(format_summary(s))
    print(f"summary: {os.path.join(args.out, SUMMARY)}")
    return 0
