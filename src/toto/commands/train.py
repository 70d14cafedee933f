"""`toto train`: pre-train on token shards; `--resume` continues a killed run."""

from __future__ import annotations

from .common import add_config_args, config_from_args

from .argtypes import positive_float, positive_int

HELP = "pre-train the model on token shards (next-token prediction)"


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--data", help="token shard folder, or several comma-separated (sets data.path; mix with "
                   "data.weights=[w1,w2,...])")
    p.add_argument("--out", help="run folder for checkpoints and metrics (sets train.out_dir)")
    p.add_argument("--steps", type=positive_int, help="optimizer steps (sets train.max_steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's latest checkpoint with the run's saved settings (only "
                        "--steps, --until and logging/checkpoint intervals may change)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out (checkpoints, metrics) and start a new one there")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="train on a shard folder whose toto tokenize was interrupted (complete=false)")
    p.add_argument("--until", type=positive_int, metavar="STEP",
                   help="stop at this step with a checkpoint (the schedule still runs to --steps)")
    p.add_argument("--init-from", metavar="CKPT",
                   help="start a new run from these weights (e.g. resolution fine-tuning on longer "
                        "sequences); the architecture comes from the checkpoint")
    p.add_argument("--rope-base", type=positive_float,
                   help="RoPE base (sets model.rope_base; default 50000 with --init-from, as in the paper)")


def run(args) -> int:
    from ..config import build_config
    from ..train.checkpoint import latest_checkpoint, read_config
    from ..train.distributed import shutdown
    from ..train.trainer import Trainer

    for flag, key in ((args.data, "data.path"), (args.out, "train.out_dir"), (args.steps, "train.max_steps")):
        if flag is not None:
            args.overrides.append(f"{key}={flag}")
    if args.rope_base is None and args.init_from:
        args.rope_base = 50000.0
    if args.rope_base is not None:
        args.overrides.append(f"model.rope_base={args.rope_base}")
    saved = None
    if args.resume:  # the run's saved settings, changed only where this command line says so
        where = build_config(None, None, [o for o in args.overrides if o.startswith("train.out_dir=")])
        saved = latest_checkpoint(where.train.out_dir)
    if saved is not None:
        cfg = build_config(args.preset, args.config, args.overrides, base=read_config(saved))
    else:
        cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, init_from=args.init_from,
                      overwrite=args.overwrite, allow_incomplete=args.allow_incomplete)
    main = trainer.dist.is_main
    try:
        if main:
            print(f"model: {trainer.model.num_params() / 1e6:.2f}M parameters, {trainer.cfg.model.n_layers} "
                  f"layers, width {trainer.cfg.model.dim}; {trainer.accum} micro-batch(es) of "
                  f"{trainer.cfg.train.micro_batch_size} x {trainer.dist.world_size} rank(s) per step; "
                  f"{len(trainer.train_idx)} train / {len(trainer.val_idx)} val sequences; {trainer.device}, "
                  f"{trainer.precision}, torch.compile {'on' if trainer.cfg.train.compile else 'off'}, "
                  f"data parallel: {trainer.parallel}")
        s = trainer.fit(until=args.until)
    finally:
        shutdown()
    if main:
        val = f"{s.val_loss:.4f}" if s.val_loss is not None else "n/a"
        print(f"done: {s.steps} steps, {s.tokens:,} tokens, train loss {s.train_loss:.4f}, val loss {val} "
              f"(uniform ln V = {s.uniform_loss:.4f}); checkpoint {s.checkpoint}")
    return 0
