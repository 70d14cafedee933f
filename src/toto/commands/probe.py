"""`toto probe`: attentive (and average-pooling) probes on every layer of a frozen checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from .argtypes import positive_int
from .common import add_clips, add_device, add_job_config, add_labelled_data, add_model_source, add_options, job_config

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

    add_model_source(p)
    add_labelled_data(p)
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
    add_device(p)
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="samples per forward pass when extracting (default 32); with --online, per tokenizer call "
                        "(the forward batch is --probe-batch-size)")
    add_clips(p)
    add_job_config(p, "probe")
    add_options(p, ProbeConfig, "probe", title="probe training")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.probe import POOLINGS, ProbeConfig, ProbeJob
    from ..train.distributed import world

    poolings = [x.strip() for x in args.pooling.split(",") if x.strip()]
    bad = [x for x in poolings if x not in POOLINGS]
    if bad or not poolings:
        raise ConfigError(f"--pooling takes {', '.join(POOLINGS)} (comma-separated), got {args.pooling!r}")
    probe_cfg = job_config(ProbeConfig, "probe", args)
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
