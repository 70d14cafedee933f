"""`toto anticipate synth`: a generated STA release (Ego4D layout, exact verbs and TTCs)."""

from __future__ import annotations

HELP = "write a generated STA release: annotations (v1/v2 layout), clips, noisy object_detections.json"


def add_arguments(p):
    p.add_argument("--out", required=True, help="release folder to write")
    p.add_argument("--train", type=int, default=64, help="train clips (one annotated frame each)")
    p.add_argument("--val", type=int, default=32, help="val clips")
    p.add_argument("--test", type=int, default=8, help="unannotated test clips")
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--context", type=int, default=24, help="frames before the annotated frame")
    p.add_argument("--layout", choices=["v1", "v2"], default="v2", help="video_id (v1) or video_uid (v2) keys")
    p.add_argument("--noun-error", type=float, default=0.1, help="chance a detection's noun is random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from ..data.sta_synth import make_sta_release
    from ..errors import ConfigError

    if args.width % 2 or args.height % 2 or args.width < 64 or args.height < 64:
        raise ConfigError("--width/--height must be even and >= 64 (H.264 clips, three objects and a hand)")
    if min(args.train, args.val, args.test) < 0 or args.context < 1:
        raise ConfigError("--train/--val/--test must be >= 0 and --context >= 1")
    out = make_sta_release(args.out, args.train, args.val, args.test, args.width, args.height, args.fps,
                           args.context, version=args.layout, noun_error=args.noun_error, seed=args.seed,
                           progress=not args.no_progress)
    print(f"wrote {out}/annotations/fho_sta_{{train,val,test_unannotated}}.json, {out}/clips, "
          f"{out}/object_detections.json")
    return 0
