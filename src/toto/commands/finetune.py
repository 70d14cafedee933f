"""`toto finetune`: fine-tune a pre-trained checkpoint with an attentive probe on one layer,
cross-entropy on the probe plus the next-token loss (the paper's ImageNet fine-tuning)."""

from __future__ import annotations

import os

from .argtypes import nonnegative_float, nonnegative_int, positive_int

HELP = "fine-tune a checkpoint on a labelled dataset: probe cross-entropy + next-token loss"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.finetune import FinetuneConfig

    d = FinetuneConfig()
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer file the model was trained with")
    p.add_argument("--data", required=True, help="dataset root with train/ and val/ class folders (or train.txt/val.txt)")
    p.add_argument("--out", required=True,
                   help="output folder: checkpoints/, metrics.jsonl, results.json, finetune.png, tokens/")
    p.add_argument("--layer", type=nonnegative_int,
                   help="layer the attentive probe reads (0 = embeddings; default: the middle one, n_layers // 2, "
                        "since decoder-only models hold the most class information in their middle layers)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help=f"(default {d.epochs})")
    p.add_argument("--lr", type=nonnegative_float, default=d.lr,
                   help=f"peak learning rate of the pre-trained trunk (default {d.lr}); 0 freezes it")
    p.add_argument("--probe-lr", type=nonnegative_float, default=d.probe_lr,
                   help=f"peak learning rate of the probe (default {d.probe_lr}, the probe's own default)")
    p.add_argument("--ntp-weight", type=nonnegative_float, default=d.ntp_weight,
                   help=f"W in loss = CE + W x next-token NLL (default {d.ntp_weight}; 0: plain fine-tuning)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"sequences per step (default {d.batch_size})")
    p.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay,
                   help=f"AdamW decay on matrices only (default {d.weight_decay})")
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=d.warmup_epochs,
                   help=f"linear warm-up, then cosine decay to 0 (default {d.warmup_epochs})")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help=f"max global gradient norm, 0 = off (default {d.grad_clip})")
    p.add_argument("--heads", type=positive_int, default=d.heads, help="attentive-probe heads (default: the model's)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default=d.dtype,
                   help="auto: bf16 autocast on GPU, fp32 on CPU (default auto)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"probe initialisation and batch order (default {d.seed})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--until", type=positive_int, metavar="EPOCH",
                   help="stop after this epoch with a checkpoint (the schedule still runs to --epochs)")
    p.add_argument("--cache", help="token cache folder (default: OUT/tokens); reruns reuse it")
    p.add_argument("--frames", type=positive_int, default=16, help="frames per video sequence (default 16, as in pre-training)")
    p.add_argument("--stride", type=positive_int, default=4, help="keep one video frame in STRIDE (default 4)")
    p.add_argument("--clip", choices=("center", "first", "last"), default="center",
                   help="which FRAMES-frame window of a longer video (default center, the usual single-clip test; last: the one ending at the last frame, for CATER)")
    p.add_argument("--max-per-class", type=positive_int, help="use at most this many samples per class and split")
    

def run(args) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..tasks.base import world
    from ..eval.finetune import FinetuneConfig, FinetuneJob

    for name in ("frames", "stride"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_per_class is not None and args.max_per_class < 1:
        raise ConfigError(f"--max-per-class must be >= 1, got {args.max_per_class}")
    cfg = FinetuneConfig(layer=args.layer, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         probe_lr=args.probe_lr, ntp_weight=args.ntp_weight, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, grad_clip=args.grad_clip, heads=args.heads,
                         dtype=args.dtype, seed=args.seed).validate()
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
