"""`toto probe`: attentive (and average-pooling) probes on every layer of a frozen checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from .argtypes import nonnegative_float, positive_int

HELP = "probe a frozen checkpoint layer by layer on a labelled image or video dataset"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def _int_list(text: str) -> list[int]:
    from ..errors import ConfigError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated integers like 0,2,4, got {text!r}") from None


def add_arguments(p):
    from ..eval.probe import ProbeConfig

    d = ProbeConfig()
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer file the model was trained with")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ class folders (or train.txt/val.txt)")
    p.add_argument("--out", required=True, help="output folder for results.json, probe.png and the feature cache")
    p.add_argument("--layers", help="comma-separated layers to probe (0 = embeddings; default: all, 0..n_layers)")
    p.add_argument("--pooling", default="attentive,average", help="attentive, average or both (default: both)")
    p.add_argument("--random-init", action="store_true",
                   help="also probe a randomly initialised model of the same shape (the run's seed) as a baseline")
    p.add_argument("--cache", help="feature cache folder (default: OUT/features), with --online the token cache "
                                   "(default: OUT/tokens); reruns reuse it")
    p.add_argument("--online", action="store_true",
                   help="no feature cache: cache token sequences only and train all probes together, one frozen "
                        "forward per batch (for large data sets; see docs/probe.md)")
    p.add_argument("--resume", action="store_true", help="with --online: continue the run in --out from its saved state")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="samples per forward pass when extracting (default 32); with --online, per tokenizer call "
                        "(the forward batch is --probe-batch-size)")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per video sequence (default 16, as in pre-training)")
    p.add_argument("--stride", type=positive_int, default=4, help="keep one video frame in STRIDE (default 4)")
    p.add_argument("--clip", choices=("center", "first", "last"), default="center",
                   help="which FRAMES-frame window of a longer video (default center, the usual single-clip test; last: the one ending at the last frame, for CATER)")
    p.add_argument("--max-per-class", type=positive_int, help="use at most this many samples per class and split")
    g = p.add_argument_group("probe training")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"(default {d.epochs})")
    g.add_argument("--lr", type=nonnegative_float, default=d.lr, help=f"AdamW peak learning rate (default {d.lr})")
    g.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    g.add_argument("--probe-batch-size", type=positive_int, default=d.batch_size, help=f"(default {d.batch_size})")
    g.add_argument("--warmup-epochs", type=nonnegative_float, default=d.warmup_epochs, help=f"(default {d.warmup_epochs})")
    g.add_argument("--heads", type=positive_int, default=d.heads, help="attentive-probe heads (default: the model's)")
    g.add_argument("--norm", choices=("batchnorm", "layernorm"), default=d.norm,
                   help=f"normalisation of the pooled vector, no affine parameters (default {d.norm})")
    g.add_argument("--seed", type=int, default=d.seed, help=f"probe initialisation and batch order (default {d.seed})")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.probe import POOLINGS, ProbeConfig, ProbeJob
    from ..tasks.base import world

    poolings = [x.strip() for x in args.pooling.split(",") if x.strip()]
    bad = [x for x in poolings if x not in POOLINGS]
    if bad or not poolings:
        raise ConfigError(f"--pooling takes {', '.join(POOLINGS)} (comma-separated), got {args.pooling!r}")
    for name in ("batch_size", "frames", "stride"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise ConfigError(f"--max-per-class must be >= 1, got {args.max_per_class}")
    probe_cfg = ProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                            heads=args.heads, norm=args.norm, seed=args.seed).validate()
    job = ProbeJob(checkpoint=args.checkpoint, tokenizer=args.tokenizer, data=args.data, out=Path(args.out),
                   layers=_int_list(args.layers) if args.layers else None, poolings=poolings,
                   random_init=args.random_init, cache=args.cache, device=args.device,
                   batch_size=args.batch_size, frames=args.frames, stride=args.stride, clip=args.clip,
                   max_per_class=args.max_per_class, probe=probe_cfg, progress=not args.no_progress,
                   online=args.online, resume=args.resume)
    report = job.run()
    if world()[0] != 0:
        return 0  # under torchrun rank 0 reports
    print(job.table(report))
    print(f"results: {os.path.join(args.out, 'results.json')}  plot: {os.path.join(args.out, 'probe.png')}")
    return 0
