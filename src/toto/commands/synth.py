"""`toto synth`: synthetic datasets rendered on any machine (today: CATER-style scenes)."""

from __future__ import annotations

HELP = "render synthetic datasets (CATER-style object-permanence scenes with MuJoCo)"


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
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
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
