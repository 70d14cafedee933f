"""`toto cater`: CATER snitch localisation, frozen probe and fine-tuning vs random init vs the oracle."""

from __future__ import annotations

HELP = "CATER snitch localisation: frozen probe + fine-tuning vs random init vs the last-seen oracle"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.finetune import FinetuneConfig

    d = FinetuneConfig()
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer file the model was trained with")
    p.add_argument("--data", required=True, help="folder written by `toto lists cater` (train.txt, val.txt, cater.json)")
    p.add_argument("--out", required=True, help="output folder: results.json, results.md, one folder per run")
    p.add_argument("--frames", type=int, default=16, help="frames per clip, the window ending at the last frame (default 16)")
    p.add_argument("--stride", type=int, default=2,
                   help="source frames between sampled frames (default 2; CATER's 301-frame videos: 20 for 16 "
                        "frames, 9 for 32)")
    p.add_argument("--layer", type=int, help="layer the attentive probe reads (default: the middle one)")
    p.add_argument("--probe-epochs", type=int, default=10, help="epochs of the frozen probe (0 skips it; default 10)")
    p.add_argument("--finetune-epochs", type=int, default=3, help="epochs of fine-tuning (0 skips it; default 3)")
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init baseline")
    p.add_argument("--lr", type=float, default=d.lr, help=f"fine-tuning trunk learning rate (default {d.lr})")
    p.add_argument("--probe-lr", type=float, default=d.probe_lr, help=f"probe learning rate (default {d.probe_lr})")
    p.add_argument("--ntp-weight", type=float, default=d.ntp_weight,
                   help=f"weight of the next-token loss while fine-tuning (default {d.ntp_weight})")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    from ..eval.cater import run_eval

    rep = run_eval(args.checkpoint, args.tokenizer, args.data, args.out, frames=args.frames, stride=args.stride,
                   layer=args.layer, probe_epochs=args.probe_epochs, finetune_epochs=args.finetune_epochs,
                   random_init=not args.no_random_init, batch_size=args.batch_size, device=args.device,
                   progress=not args.no_progress,
                   finetune_cfg={"lr": args.lr, "probe_lr": args.probe_lr, "ntp_weight": args.ntp_weight})
    print(rep["table"], end="")
    print(f"(top-1 / top-5 in %, L1 in grid cells; val clips; written to {args.out}/results.json)")
    return 0
