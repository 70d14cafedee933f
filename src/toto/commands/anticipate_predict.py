"""`toto anticipate predict`: a challenge-format results file from a trained STA run."""

from __future__ import annotations

LOCKS_OUT = "file"  # cli.main holds --out's lock while this runs
HELP = "write challenge-format STA results (version 1.0) for an annotation file from a trained run"


def add_arguments(p):
    from .anticipate_train import add_release_args
    from .common import add_device

    p.add_argument("--run", required=True, help="a `toto anticipate train` output folder")
    p.add_argument("--annotations-file", required=True,
                   help="fho_sta_val.json or fho_sta_test_unannotated.json")
    add_release_args(p, False)
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--detections-only", action="store_true",
                   help="the baseline without video: detection score, the train split's most frequent verb, "
                        "its mean TTC")
    add_device(p)


def run(args) -> int:
    from ..eval.anticipation import predict_job

    rep = predict_job(args.run, args.annotations_file, args.clips, args.detections, args.out,
                      args.detections_only, args.device, not args.no_progress)
    print(f"wrote {args.out}: {rep['predicted']} of {rep['uids']} uids predicted"
          + (f", skipped {rep['skipped']}" if rep["skipped"] else ""))
    return 0
