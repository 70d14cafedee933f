"""`toto forecast`: continue videos from their first frames with a trained checkpoint."""

from __future__ import annotations

import os

from .common import add_job_config, add_model_source, add_options, job_config

HELP = "forecast the next frames of videos token by token and score them against the real frames"
LOCKS_OUT = True  # cli.main holds --out's lock while this runs


def add_arguments(p):
    from ..eval.forecast import ForecastSettings

    add_model_source(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", nargs="+", metavar="PATH", help="one or more video files (forecast together, batched)")
    src.add_argument("--data", metavar="DIR", help="token-shard folder (with --index): forecast stored sequences")
    p.add_argument("--index", type=int, nargs="+", metavar="I", help="sequence indices in --data (default: 0)")
    p.add_argument("--out", required=True, help="output folder: forecast.json, <name>_strip.png, <name>.gif/.mp4")
    add_job_config(p, "forecast")
    add_options(p, ForecastSettings, "forecast", title="forecasting and sampling")


def run(args) -> int:
    from ..errors import ConfigError
    from ..eval.forecast import (ForecastSettings, forecast, load_for_forecast, shard_inputs, summary_table,
                                 video_input)

    if args.index is not None and args.data is None:
        raise ConfigError("--index selects sequences of --data DIR; it has no meaning with --video")
    s = job_config(ForecastSettings, "forecast", args)
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
