"""`toto finetune`: fine-tune a pre-trained checkpoint with an attentive probe on one layer,
cross-entropy on the probe plus the next-token loss (the paper's ImageNet fine-tuning)."""

from __future__ import annotations

import os

from .argtypes import positive_int
from .common import add_clips, add_device, add_job_config, add_labelled_data, add_model_source, add_options, job_config

HELP = "fine-tune a checkpoint on a labelled dataset: probe cross-entropy + next-token loss"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.finetune import FinetuneConfig

    add_model_source(p)
    add_labelled_data(p)
    p.add_argument("--out", required=True,
                   help="output folder: checkpoints/, metrics.jsonl, results.json, finetune.png, tokens/")
    add_device(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--until", type=positive_int, metavar="EPOCH",
                   help="stop after this epoch with a checkpoint (the schedule still runs to --epochs)")
    p.add_argument("--cache", help="token cache folder (default: OUT/tokens); reruns reuse it")
    add_clips(p)
    add_job_config(p, "finetune")
    add_options(p, FinetuneConfig, "finetune", title="fine-tuning")


def run(args) -> int:
    from pathlib import Path

    from ..train.distributed import world
    from ..eval.finetune import FinetuneConfig, FinetuneJob

    cfg = job_config(FinetuneConfig, "finetune", args)
    job = FinetuneJob(checkpoint=args.checkpoint, tokenizer=args.tokenizer, data=args.data, out=Path(args.out),
                      cfg=cfg, cache=args.cache, device=args.device, frames=args.frames, stride=args.stride,
                      clip=args.clip, max_per_class=args.max_per_class, resume=args.resume, until=args.until,
                      progress=not args.no_progress)
    report = job.run()
    if world()[0] != 0:
        return 0  # under torchrun rank 0 reports
    print(job.table(report))
    print(f"results: {os.path.join(args.out, 'results.json')}  plot: {os.path.join(args.out, 'finetune.png')}  "
          f"checkpoint: {report.get('finetuned_checkpoint')}")
    return 0
