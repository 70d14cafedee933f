"""`toto track`: DAVIS-2017 label propagation with a frozen checkpoint's features; J&F table."""

from __future__ import annotations

from .argtypes import nonnegative_int, positive_int
from .common import add_device, add_job_config, add_model_source, add_options, job_config

HELP = "video object segmentation by label propagation (DAVIS-2017 layout), scored with J&F"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.tracking import PropagationConfig

    p.add_argument("--data", required=True, metavar="DAVIS_ROOT",
                   help="folder in the DAVIS-2017 layout (JPEGImages/480p, Annotations/480p, ImageSets/2017)")
    p.add_argument("--out", required=True, help="results folder: <seq>/<frame>.png, results.json, overlay gif")
    p.add_argument("--features", choices=["model", "pixels", "copy-first"], default="model",
                   help="model hidden states (default), raw RGB patches, or the copy-the-first-mask baseline")
    add_model_source(p, required=False, what=" (--features model)")
    p.add_argument("--layer", type=nonnegative_int, default=None,
                   help="hidden-state layer: 0 = embeddings, i = after block i (default: the middle one)")
    p.add_argument("--context", choices=["image", "video"], default="image",
                   help="each frame alone as an image sequence, or with its preceding frames as a video")
    p.add_argument("--video-frames", type=positive_int, default=4, help="frames in the causal window for --context video")
    p.add_argument("--resize", choices=["square", "keep-aspect"], default="square",
                   help="frame resizing before featurising (default square R x R)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="R in pixels (default: the tokenizer's; 128 for --features pixels)")
    p.add_argument("--patch", type=positive_int, default=8, help="patch size for --features pixels")
    p.add_argument("--sequences", nargs="+", metavar="SEQ", help="only these sequences")
    p.add_argument("--subset", default="val", help="ImageSets/2017/<subset>.txt lists the sequences")
    p.add_argument("--void", choices=["ignore", "background"], default="ignore",
                   help="void (255) pixels: left out of J and F, or counted as background (official script)")
    p.add_argument("--overlay", default="", metavar="SEQ",
                   help="sequence to render as an overlay gif (default: the first; 'none' for no gif)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="frames per forward pass")
    add_device(p)
    add_job_config(p, "track")
    add_options(p, PropagationConfig, "track", title="label propagation")


def build_features(args):
    from ..device import resolve_device
    from ..errors import ConfigError
    from ..eval.tracking import ModelFeatures, PixelFeatures

    if args.features == "copy-first":
        return None
    if args.features == "pixels":
        return PixelFeatures(args.resolution or 128, args.patch, args.resize)
    if not args.checkpoint or not args.tokenizer:
        raise ConfigError("--features model needs --checkpoint and --tokenizer "
                          "(or use --features pixels / copy-first)")
    from ..eval.features import SequenceSpec
    from ..eval.backbone import load_backbone

    device = resolve_device(args.device)
    # identity, vocabulary and one frame's context checked here; a video window's context once
    # the tracking resolution is known
    bb = load_backbone(args.checkpoint, args.tokenizer, SequenceSpec("image"), device)
    return ModelFeatures(bb.model, bb.tokenizer, layer=args.layer, context=args.context,
                         video_frames=args.video_frames, resize=args.resize, batch_size=args.batch_size,
                         resolution=args.resolution, device=device)


def run(args) -> int:
    from ..eval.tracking import PropagationConfig, format_table, run_tracking

    cfg = job_config(PropagationConfig, "track", args)
    features = build_features(args)
    result = run_tracking(args.data, args.out, features, cfg, sequences=args.sequences, subset=args.subset,
                          void=args.void, overlay_sequence=None if args.overlay == "none" else args.overlay,
                          progress=not args.no_progress)
    print(format_table(result))
    print(f"masks and results.json written to {args.out}")
    return 0
