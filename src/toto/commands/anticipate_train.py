"""`toto anticipate train`: Toto + pyramid + RoIAlign heads on an STA release."""

from __future__ import annotations

LOCKS_OUT = True  # cli.main holds --out's lock while this runs
HELP = "train the STA heads (verb, TTC) on Toto's 5-layer pyramid, frozen or fine-tuned"


def add_release_args(p, train: bool):
    p.add_argument("--clips", required=True, help="folder of canonical clips <clip_uid>.mp4")
    p.add_argument("--detections", required=True, help="object_detections.json {uid: [{box, score, noun}]}")
    if train:
        p.add_argument("--annotations", required=True, help="folder with fho_sta_train.json and fho_sta_val.json")


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="toto train run (or checkpoint folder)")
    p.add_argument("--tokenizer", required=True, help="the tokenizer the checkpoint was trained with")
    add_release_args(p, True)
    p.add_argument("--out", required=True, help="run folder (resumes when it holds a state.pt)")
    p.add_argument("--mode", choices=["frozen", "finetune"], default="frozen",
                   help="frozen trunk, or fine-tune it with the heads + next-token loss")
    p.add_argument("--random-init", action="store_true", help="the same architecture at random init (baseline)")
    p.add_argument("--frames", type=int, default=8, help="context frames")
    p.add_argument("--stride", type=int, default=3, help="frames between context frames")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate")
    p.add_argument("--trunk-lr", type=float, default=1e-4, help="trunk learning rate (finetune)")
    p.add_argument("--ntp-weight", type=float, default=0.5, help="next-token loss weight (finetune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..eval.anticipation import StaConfig, train_job
    from ..eval.sta_metric import PAPER_NAMES, SHORT_NAMES

    cfg = StaConfig(frames=args.frames, stride=args.stride, mode=args.mode, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, trunk_lr=args.trunk_lr, ntp_weight=args.ntp_weight,
                    seed=args.seed)
    rep = train_job(args.checkpoint, args.tokenizer, args.annotations, args.clips, args.detections, args.out,
                    cfg, args.random_init, args.device, not args.no_progress)
    for label, scores in (("model", rep["val"]), ("detections only", rep["detections_only_val"])):
        print(f"val {label}: " + ", ".join(f"{n} {scores[k]:.2f}" for n, k in zip(PAPER_NAMES, SHORT_NAMES)))
    for split, items in rep["skipped"].items():
        for reason, names in items.items():
            print(f"{split}: skipped {len(names)} {reason} (e.g. {names[0]})")
    print(f"wrote {args.out}/report.json, sta.safetensors, val_results.json")
    return 0
