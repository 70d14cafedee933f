"""`toto train`: pre-train on token shards; `--resume` continues a killed run."""

from __future__ import annotations

from .common import add_config_args, config_from_args

HELP = "pre-train the model on token shards (next-token prediction)"


def add_arguments(p):
    add_config_args(p)
    p.add_argument("--data", help="token shard folder (sets data.path)")
    p.add_argument("--out", help="run folder for checkpoints and metrics (sets train.out_dir)")
    p.add_argument("--steps", type=int, help="optimizer steps (sets train.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    from ..train.trainer import Trainer

    for flag, key in ((args.data, "data.path"), (args.out, "train.out_dir"), (args.steps, "train.max_steps")):
        if flag is not None:
            args.overrides.append(f"{key}={flag}")
    cfg = config_from_args(args)
    trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
    n = trainer.model.num_params()
    print(f"model: {n / 1e6:.2f}M parameters, {trainer.cfg.model.n_layers} layers, width "
          f"{trainer.cfg.model.dim}; {trainer.accum} micro-batches of {trainer.cfg.train.micro_batch_size} "
          f"per step; {len(trainer.train_idx)} train / {len(trainer.val_idx)} val sequences")
    s = trainer.fit()
    val = f"{s.val_loss:.4f}" if s.val_loss is not None else "n/a"
    print(f"done: {s.steps} steps, {s.tokens:,} tokens, train loss {s.train_loss:.4f}, val loss {val} "
          f"(uniform ln V = {s.uniform_loss:.4f}); checkpoint {s.checkpoint}")
    return 0
