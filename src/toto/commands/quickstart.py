"""`toto quickstart`: the whole pipeline end to end, with a report."""

from __future__ import annotations

from pathlib import Path

from .argtypes import nonnegative_int, positive_int
from .common import add_clips

HELP = "run the whole pipeline (tokenize, pre-train, probe, fine-tune, track, forecast) and write a report"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..config import PRESETS
    from ..quickstart import TINY_STEPS, QuickstartOptions as D  # the defaults live on the dataclass

    p.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="tiny (default): shipped sample data on a CPU in ~10 min; base/large/1b: paper "
                        "scale on your --videos/--images")
    p.add_argument("--videos", nargs="*", default=[], metavar="PATH", help="video files/folders/lists")
    p.add_argument("--images", nargs="*", default=[], metavar="PATH", help="image files/folders/lists")
    p.add_argument("--tokenizer", metavar="FILE", help="use this tokenizer file (e.g. `toto tokenizer "
                   "convert-dalle` output) instead of fitting one")
    p.add_argument("--fit-tokenizer", dest="tokenizer_kind", choices=("patch", "dvae"), default="patch",
                   help="tokenizer to fit when --tokenizer is not given (default patch: k-means, fast)")
    p.add_argument("--probe-data", metavar="ROOT", help="class-folder dataset (default: scikit-learn digits)")
    p.add_argument("--davis", metavar="ROOT", help="DAVIS-2017 layout folder (default: a synthetic set)")
    p.add_argument("--resolution", type=positive_int, help="frame size (default 64 for tiny, 128 for paper presets)")
    p.add_argument("--n-codes", type=positive_int, default=D.n_codes,
                   help="codebook size of a fitted tokenizer (default %(default)s)")
    add_clips(p, clip=False)
    p.add_argument("--steps", type=positive_int, help=f"pre-training steps (default: {TINY_STEPS} for tiny, the preset's otherwise)")
    p.add_argument("--probe-epochs", type=positive_int, default=D.probe_epochs, help="default %(default)s")
    p.add_argument("--finetune-epochs", type=nonnegative_int, default=D.finetune_epochs,
                   help="epochs of `toto finetune` on the best probed layer (default %(default)s; 0 skips it)")
    p.add_argument("--probe-max-per-class", type=positive_int, help="cap on probe images per class and split (default: all)")
    p.add_argument("--moving-digits", type=nonnegative_int, default=D.moving_digits, help="moving-digit clips made "
                   "for the tiny preset (default %(default)s)")
    p.add_argument("--cater-clips", type=nonnegative_int, default=D.cater_clips, help="CATER-style clips for the "
                   "object-permanence stage (tiny preset; needs the sim extra and an offscreen GL; default "
                   "%(default)s, 0 skips it)")
    p.add_argument("--fresh", action="store_true", help="delete --out and redo every stage")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="training config overrides")


def run(args) -> int:
    from ..quickstart import Quickstart, QuickstartOptions

    opts = QuickstartOptions(out=Path(args.out), preset=args.preset, videos=args.videos, images=args.images,
                             tokenizer=args.tokenizer, tokenizer_kind=args.tokenizer_kind,
                             probe_data=args.probe_data, davis=args.davis, resolution=args.resolution,
                             n_codes=args.n_codes, frames=args.frames, stride=args.stride, steps=args.steps,
                             probe_epochs=args.probe_epochs, probe_max_per_class=args.probe_max_per_class,
                             finetune_epochs=args.finetune_epochs, cater_clips=args.cater_clips,
                             moving_digits=args.moving_digits, overrides=args.overrides, fresh=args.fresh,
                             progress=not args.no_progress)
    report = Quickstart(opts).run()
    print(f"done. open {report}")
    return 0
