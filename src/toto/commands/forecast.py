"""`toto forecast`: continue videos from their first frames with a trained checkpoint."""

from __future__ import annotations

import os

from .argtypes import positive_int

HELP = "forecast the next frames of videos token by token and score them against the real frames"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.forecast import ForecastSettings

    d = ForecastSettings()
    p.add_argument("--checkpoint", required=True, help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer file the model was trained with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", nargs="+", metavar="PATH", help="one or more video files (forecast together, batched)")
    src.add_argument("--data", metavar="DIR", help="token-shard folder (with --index): forecast stored sequences")
    p.add_argument("--index", type=int, nargs="+", metavar="I", help="sequence indices in --data (default: 0)")
    p.add_argument("--out", required=True, help="output folder: forecast.json, <name>_strip.png, <name>.gif/.mp4")
    p.add_argument("--context-frames", type=positive_int, default=d.context_frames,
                   help=f"real frames given to the model (default {d.context_frames})")
    p.add_argument("--frames", type=positive_int, default=d.frames, help=f"frames to forecast (default {d.frames})")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="keep one video frame in STRIDE (default: the stride recorded in the index of the model's "
                        "training shards, else 4)")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"(default {d.temperature})")
    g.add_argument("--top-k", type=int, default=d.top_k, help="sample among the K most likely codes (default: all)")
    g.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1] (default: off)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely code (ignores the above)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"sampling seed (default {d.seed})")
    p.add_argument("--fps", type=positive_int, default=d.fps, help=f"frame rate of the written videos (default {d.fps})")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (CUDA graphs on GPU: ~10x faster decoding after a "
                        "one-off compilation of ~10 s; docs/performance.md)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.forecast import (ForecastSettings, forecast, load_for_forecast, shard_inputs, summary_table,
                                 video_input)

    if args.index is not None and args.data is None:
        raise ConfigError("--index selects sequences of --data DIR; it has no meaning with --video")
    s = ForecastSettings(context_frames=args.context_frames, frames=args.frames, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                         stride=args.stride, fps=args.fps, device=args.device,
                         compile=args.compile).validate()
    bb, device = load_for_forecast(args.checkpoint, args.tokenizer, s)
    model, state, tok, layout = bb.model, bb.state, bb.tokenizer, bb.layout
    if args.video:
        items = [video_input(v, tok, s) for v in args.video]
        names = [it.name for it in items]
        for i, it in enumerate(items):  # two clips with one stem must not overwrite each other
            if names.count(it.name) > 1:
                it.name = f"{it.name}_{i}"
    else:
        items = shard_inputs(args.data, args.index or [0], tok, s)
    meta = {"checkpoint": state["path"], "step": state.get("step"), "tokenizer": os.path.abspath(args.tokenizer),
            "tokenizer_identity": {k: tok.identity()[k] for k in ("kind", "n_codes", "downsample", "resolution")}}
    report = forecast(model, layout, tok, items, s, args.out, device, progress=not args.no_progress, meta=meta)
    print(summary_table(report))
    print(f"results: {os.path.join(args.out, 'forecast.json')}")
    return 0
