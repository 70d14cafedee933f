"""`toto lists`: list files for `toto probe`/`toto finetune` from the ImageNet and Kinetics releases."""

from __future__ import annotations

import statistics
from pathlib import Path

from .argtypes import positive_int

HELP = "write ROOT/<split>.txt list files from the official ImageNet-1k or Kinetics annotations"


def add_arguments(p):
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    im = sub.add_parser("imagenet", help="label ImageNet's flat val folder (Kaggle CSV or devkit)",
                        description="Label ImageNet-1k's flat val folder by WNID (the train class folder names).")
    im.add_argument("--val-dir", required=True, help="folder of ILSVRC2012_val_*.JPEG (searched recursively)")
    src = im.add_mutually_exclusive_group(required=True)
    src.add_argument("--solution", metavar="CSV", help="Kaggle's LOC_val_solution.csv")
    src.add_argument("--ground-truth", metavar="TXT",
                     help="devkit ILSVRC2012_validation_ground_truth.txt (needs --meta)")
    im.add_argument("--meta", help="devkit meta.mat mapping ILSVRC2012_ID to WNID")
    im.add_argument("--train-dir", help="train folder of class folders: every label must be one of them")
    im.add_argument("--out", required=True, help="list file to write, e.g. ROOT/val.txt")
    im.set_defaults(_locks_out="file")  # cli.main holds --out's lock while this runs
    ki = sub.add_parser("kinetics", help="find Kinetics clips of an annotation CSV on disk",
                        description="Find the clips of a Kinetics-400/600/700 annotation CSV under the given "
                                    "folders by their canonical names; missing clips are counted, not errors.")
    ki.add_argument("--csv", required=True, help="train.csv / validate.csv / val.csv / test.csv of the release")
    ki.add_argument("--videos", required=True, action="append", metavar="DIR",
                    help="folder searched recursively for {youtube_id}_{start:06d}_{end:06d}.mp4|mkv|webm "
                         "(repeatable)")
    ki.add_argument("--max-per-class", type=positive_int, help="keep at most this many found clips per class (CSV order)")
    ki.add_argument("--out", required=True, help="list file to write, e.g. ROOT/val.txt")
    ki.set_defaults(_locks_out="file")
    ca = sub.add_parser("cater", help="CATER snitch localisation: the release's lists/localize/{train,val}.txt",
                        description="Check the videos of a CATER release (or of `toto synth cater`) named by "
                                    "lists/localize/{train,val}.txt and write OUT/{train,val}.txt for toto probe / "
                                    "finetune (use --clip last: the label is the snitch's cell at the last frame), "
                                    "plus OUT/cater.json (hidden-at-end and last-seen cell per video, from scenes/). "
                                    "Missing, unreadable or too-short videos and labels outside 0..35 are counted, "
                                    "named in the report and left out.")
    ca.add_argument("--root", required=True, help="an unpacked CATER variant: videos/, lists/, optional scenes/")
    ca.add_argument("--out", required=True, help="folder for train.txt, val.txt, cater.json")
    ca.add_argument("--frames", type=positive_int, default=16, help="frames per sequence the probe will sample (default 16)")
    ca.add_argument("--stride", type=positive_int, default=None,
                    help="source frames between sampled frames (default: the largest whose window fits the first "
                         "listed video, 20 for 16 frames of CATER's 301)")
    ca.add_argument("--task", default="localize", help="lists/ subfolder (default localize; localize_4x4 ... too)")
    ca.set_defaults(_locks_out=True)


def run(args) -> int:
    from ..data import lists
    from ..errors import ConfigError

    progress = not args.no_progress
    if args.dataset == "cater":
        return run_cater(args, progress)
    if args.dataset == "imagenet":
        if args.ground_truth and not args.meta:
            raise ConfigError("--ground-truth needs --meta (the devkit's meta.mat)")
        if args.solution and args.meta:
            raise ConfigError("--meta goes with --ground-truth, not --solution")
        if args.solution:
            source, rows = args.solution, lists.read_loc_solution(args.solution)
        else:
            source, rows = args.ground_truth, lists.read_devkit(args.ground_truth, args.meta)
        result = lists.imagenet_val_list(args.val_dir, rows, source, args.train_dir, progress)
    else:
        result = lists.kinetics_list(args.csv, args.videos, args.max_per_class, progress)
    report_path = lists.write_list(result, args.out)
    print_summary(result.report, Path(args.out), report_path)
    return 0


def print_summary(rep: dict, out: Path, report_path: Path) -> None:
    unique = sum(c["rows"] for c in rep["splits"].values())
    lines = [("annotations", f"{rep['annotations']} ({rep['rows']} rows)")]
    lines += [(f"split {split}", f"{c['listed']} listed of {c['rows']}") for split, c in rep["splits"].items()]
    lines.append(("missing", f"{rep['missing']} ({100 * rep['missing'] / max(unique, 1):.1f}%; not on disk, "
                             "left out)"))
    for name, key in (("empty files", "empty"), ("duplicate rows", "duplicate_rows"),
                      ("duplicate files", "duplicate_files"), ("over --max-per-class", "dropped_max_per_class"),
                      ("files not in annotations", "unlisted_files"), ("files not in annotations", "unlabelled_files")):
        if rep.get(key):
            lines.append((name, str(rep[key])))
    counts = list(rep["per_class"].values())
    lines.append(("classes", f"{rep['n_classes']} (samples per class: min {min(counts)}, "
                             f"median {statistics.median(counts):g}, max {max(counts)})"))
    lacking = rep.get("n_classes_annotated", rep["n_classes"]) - rep["n_classes"]
    if lacking:
        lines.append(("warning", f"{lacking} annotated class(es) have no sample on disk"))
    lines.append(("report", f"{report_path} (every missing, empty and duplicate item)"))
    print(f"toto lists {rep['kind']}: wrote {out} ({rep['listed']} samples)")
    for name, text in lines:
        print(f"  {name:<25} {text}")


def run_cater(args, progress: bool) -> int:
    from ..data import cater

    stride = args.stride
    if stride is None:
        stride = cater.stride_for(Path(args.root), args.task, args.frames)
    summary = cater.cater_lists(args.root, args.out, args.frames, stride, args.task, progress)
    print(f"toto lists cater: wrote {args.out}/train.txt, val.txt ({args.frames} frames, stride {stride}: "
          f"the last {summary['window_source_frames']} source frames of each video)")
    for split, c in summary["splits"].items():
        left = ", ".join(f"{c[k]} {k.replace('_', ' ')}" for k in ("missing", "unreadable", "short", "bad_label", "label_not_in_train") if c[k])
        print(f"  {split:<6} {c['kept']} of {c['rows']} videos" + (f" (left out: {left}; see {split}.txt.report.json)"
                                                                     if left else ""))
    hidden = [v["hidden"] for v in summary["videos"].values() if "hidden" in v]
    if hidden:
        print(f"  scenes: snitch hidden at the end in {sum(hidden)} of {len(hidden)} videos")
    return 0
