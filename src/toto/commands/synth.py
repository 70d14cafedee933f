"""`toto synth`: synthetic datasets rendered on any machine (CATER-style scenes, STA releases)."""

from __future__ import annotations

LOCKS_OUT = True  # cli.main holds --out's lock while this runs
HELP = "synthetic datasets: CATER-style object-permanence scenes (MuJoCo), Ego4D-style STA releases"


def add_arguments(p):
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    c = sub.add_parser("cater", help="CATER-style scenes: videos/*.avi, scenes/*.json, lists/localize/{train,val}.txt",
                       description="Render CATER-style scenes (cones, cylinders, spheres, cubes and the golden "
                                   "snitch; slide, pick-place, rotate, contain) with MuJoCo offscreen "
                                   "(MUJOCO_GL=egl unless set). Resumable: rerun the same command.")
    c.add_argument("--out", required=True, help="output folder (CATER's layout)")
    c.add_argument("--videos", type=int, required=True, help="number of clips")
    c.add_argument("--frames", type=int, default=32, help="rendered frames per clip, spread evenly over the scene (default 32)")
    c.add_argument("--camera", choices=("static", "moving"), default="static", help="fixed or moving camera (default static)")
    c.add_argument("--seed", type=int, default=0, help="clip i is the same for the same seed (default 0)")
    c.add_argument("--width", type=int, default=320, help="frame width in pixels (default 320, as CATER)")
    c.add_argument("--height", type=int, default=240, help="frame height in pixels (default 240, as CATER)")
    c.add_argument("--scene-frames", type=int, default=300, help="scene length in CATER frames (default 300)")
    c.add_argument("--max-motions", type=int, default=None,
                   help="at most this many objects move per segment (2: CATER's max2action; default: all)")
    c.add_argument("--val-fraction", type=float, default=0.3, help="share of clips in val.txt (default 0.3, as CATER)")
    s = sub.add_parser("sta", help="an Ego4D-style STA release: fho_sta_*.json (v1/v2), clips, object_detections.json",
                       description="Write a generated short-term anticipation release in the Ego4D layout: "
                                   "objects, a hand whose motion is the verb, exact times to contact, noisy "
                                   "detections.")
    s.add_argument("--out", required=True, help="release folder to write")
    s.add_argument("--train", type=int, default=64, help="train clips (one annotated frame each)")
    s.add_argument("--val", type=int, default=32, help="val clips")
    s.add_argument("--test", type=int, default=8, help="unannotated test clips")
    s.add_argument("--width", type=int, default=96)
    s.add_argument("--height", type=int, default=64)
    s.add_argument("--fps", type=float, default=30.0)
    s.add_argument("--context", type=int, default=24, help="frames before the annotated frame")
    s.add_argument("--layout", choices=["v1", "v2"], default="v2", help="video_id (v1) or video_uid (v2) keys")
    s.add_argument("--noun-error", type=float, default=0.1, help="chance a detection's noun is random")
    s.add_argument("--seed", type=int, default=0)



def run(args) -> int:
    if args.dataset == "sta":
        return run_sta(args)
    from ..synth.cater import SceneConfig, generate

    cfg = SceneConfig(frames=args.frames, scene_frames=args.scene_frames, camera=args.camera,
                      width=args.width, height=args.height, max_motions=args.max_motions)
    stats = generate(args.out, args.videos, cfg, seed=args.seed, val_fraction=args.val_fraction,
                     progress=not args.no_progress)
    rate = (f"{stats['clips_per_s']} clips/s, {stats['frames_per_s']} frames/s"
            if stats["rendered_now"] else "nothing left to render")
    print(f"{stats['videos']} clips in {args.out} ({stats['already_done']} already there, "
          f"{stats['rendered_now']} rendered in {stats['wall_s']} s: {rate}; peak RSS {stats['peak_rss_mib']} MiB)")
    return 0


def run_sta(args) -> int:
    from ..synth.sta import make_sta_release
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
