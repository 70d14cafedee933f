"""`toto cater`: CATER snitch localisation, frozen probe and fine-tuning vs random init vs the oracle."""

from __future__ import annotations

from .argtypes import nonnegative_int, positive_int
from .common import add_clips, add_device, add_job_config, add_model_source, add_options, job_config

HELP = "CATER snitch localisation: frozen probe + fine-tuning vs random init vs the last-seen oracle"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.finetune import FinetuneConfig

    add_model_source(p)
    p.add_argument("--data", required=True, help="folder written by `toto lists cater` (train.txt, val.txt, cater.json)")
    p.add_argument("--out", required=True, help="output folder: results.json, results.md, one folder per run")
    add_clips(p, frames=16, stride=2, clip=False,
              frames_help="frames per clip, the window ending at the last frame (default 16)",
              stride_help="source frames between sampled frames (default 2; CATER's 301-frame videos: 20 for 16 "
                          "frames, 9 for 32)")
    p.add_argument("--layer", type=nonnegative_int, help="layer the attentive probe reads (default: the middle one)")
    p.add_argument("--probe-epochs", type=nonnegative_int, default=10,
                   help="epochs of the frozen probe (0 skips it; default 10)")
    p.add_argument("--finetune-epochs", type=nonnegative_int, default=3,
                   help="epochs of fine-tuning (0 skips it; default 3)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init baseline")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    add_device(p)
    add_job_config(p, "finetune")
    add_options(p, FinetuneConfig, "finetune", only=("lr", "probe_lr", "ntp_weight"), title="fine-tuning")


def run(args) -> int:
    from ..eval.cater import run_eval
    from ..eval.finetune import FinetuneConfig

    rep = run_eval(args.checkpoint, args.tokenizer, args.data, args.out, frames=args.frames, stride=args.stride,
                   layer=args.layer, probe_epochs=args.probe_epochs, finetune_epochs=args.finetune_epochs,
                   random_init=not args.no_random_init, batch_size=args.batch_size, device=args.device,
                   progress=not args.no_progress,
                   finetune_cfg=job_config(FinetuneConfig, "finetune", args).to_dict())
    print(rep["table"], end="")
    print(f"(top-1 / top-5 in %, L1 in grid cells; val clips; written to {args.out}/results.json)")
    return 0
