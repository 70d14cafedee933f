"""`toto anticipate train`: Toto + pyramid + RoIAlign heads on an STA release."""

from __future__ import annotations

from .common import add_device, add_job_config, add_model_source, add_options, job_config

LOCKS_OUT = True  # cli.main holds --out's lock while this runs
HELP = "train the STA heads (verb, TTC) on Toto's 5-layer pyramid, frozen or fine-tuned"


def add_release_args(p, train: bool):
    p.add_argument("--clips", required=True, help="folder of canonical clips <clip_uid>.mp4")
    p.add_argument("--detections", required=True, help="object_detections.json {uid: [{box, score, noun}]}")
    if train:
        p.add_argument("--annotations", required=True, help="folder with fho_sta_train.json and fho_sta_val.json")


def add_arguments(p):
    from ..eval.anticipation import StaConfig

    add_model_source(p)
    add_release_args(p, True)
    p.add_argument("--out", required=True, help="run folder (resumes when it holds a state.pt)")
    p.add_argument("--random-init", action="store_true", help="the same architecture at random init (baseline)")
    add_device(p)
    add_job_config(p, "sta")
    add_options(p, StaConfig, "sta", title="STA heads and training")


def run(args) -> int:
    from ..eval.anticipation import StaConfig, train_job
    from ..eval.sta_metric import PAPER_NAMES, SHORT_NAMES

    cfg = job_config(StaConfig, "sta", args)
    rep = train_job(args.checkpoint, args.tokenizer, args.annotations, args.clips, args.detections, args.out,
                    cfg, args.random_init, args.device, not args.no_progress)
    for label, scores in (("model", rep["val"]), ("detections only", rep["detections_only_val"])):
        print(f"val {label}: " + ", ".join(f"{n} {scores[k]:.2f}" for n, k in zip(PAPER_NAMES, SHORT_NAMES)))
    for split, items in rep["skipped"].items():
        for reason, names in items.items():
            print(f"{split}: skipped {len(names)} {reason} (e.g. {names[0]})")
    print(f"wrote {args.out}/report.json, sta.safetensors, val_results.json")
    return 0
