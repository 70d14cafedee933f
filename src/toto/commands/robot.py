"""`toto robot collect | train | eval | ppo`: robot manipulation from frozen Toto features."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .common import add_device, add_job_config, add_model_source, add_options, job_config

LOCKS_OUT = True  # every action's --out is a folder; cli.main holds its lock while it runs
HELP = "robot manipulation (Meta-World in MuJoCo, LeRobot demos): collect expert demos, behaviour cloning and PPO on frozen Toto features, evaluate"


def _layer_groups(values: list[str]) -> list[list[int]]:
    """``["2", "4", "2,4"]`` -> ``[[2], [4], [2, 4]]`` (a group's features are concatenated)."""
    out = []
    for v in values:
        try:
            out.append([int(x) for x in v.replace("+", ",").split(",") if x.strip()])
        except ValueError:
            raise ConfigError(f"--layers {v!r}: expected layer numbers like 2 or 2,4") from None
    return out


def add_arguments(p):
    from ..robot.bc import BCConfig

    sub = p.add_subparsers(dest="robot_command", metavar="ACTION", required=True)

    c = sub.add_parser("collect", help="scripted-expert demonstrations of a Meta-World v3 task",
                       description="Run the task's scripted expert on seeds SEED, SEED+1, ... until EPISODES "
                                   "succeed; failed episodes are counted and excluded. Resumable: each episode "
                                   "is written atomically when done.")
    c.add_argument("--task", required=True, help="Meta-World v3 task, e.g. drawer-open (the -v3 suffix is optional)")
    c.add_argument("--episodes", type=int, default=25, help="successful episodes to keep (default 25, CortexBench's)")
    c.add_argument("--out", required=True, metavar="DIR")
    c.add_argument("--seed", type=int, default=0, help="first scene seed (default 0)")
    c.add_argument("--max-attempts", type=int, help="seeds to try at most (default 2 x episodes + 10)")
    c.add_argument("--horizon", type=int, help="steps before an episode counts as failed (default 250)")
    c.add_argument("--resolution", type=int, help="camera image size in pixels (default 128)")
    c.set_defaults(_action=_collect)

    v = sub.add_parser("videos", help="demo episodes as mp4 files (pre-training data for toto tokenize)",
                       description="Write each episode of a demo folder as OUT/<episode>.mp4 (H.264).")
    v.add_argument("--demos", required=True, metavar="DIR")
    v.add_argument("--out", required=True, metavar="DIR")
    v.add_argument("--fps", type=float, default=20.0)
    v.set_defaults(_action=_videos)

    t = sub.add_parser("train", help="behaviour cloning on frozen Toto features (+ random-init Toto and pixels-CNN baselines)",
                       description="Train an MLP policy on frozen Toto features of each --layers group, the same "
                                   "on a random-init Toto, and a small CNN end to end on pixels; same demos and "
                                   "seed for all. --eval-episodes N then evaluates each in simulation.")
    t.add_argument("--demos", required=True, metavar="DIR", help="a `toto robot collect` folder or a LeRobot v2 dataset")
    t.add_argument("--out", required=True, metavar="DIR")
    add_model_source(t, required=False, what=" of a pre-trained Toto; without it only the CNN")
    t.add_argument("--layers", nargs="+", default=None, metavar="L[,L]",
                   help="layer groups, each a policy: 2 4 2,4 = middle, last, middle+last (default: middle and last)")
    t.add_argument("--context", type=int, default=1,
                   help="frames of image context: 1 = the current frame as an image, k = the last k as a video")
    t.add_argument("--no-random-init", action="store_true", help="skip the random-init Toto baseline")
    t.add_argument("--no-cnn", action="store_true", help="skip the pixels-CNN baseline")
    t.add_argument("--cache", metavar="DIR", help="feature cache (default OUT/features)")
    t.add_argument("--camera", help="LeRobot video stream to use (default: the first)")
    t.add_argument("--task", help="simulation task for --eval-episodes (default: the demos' task)")
    t.add_argument("--eval-episodes", type=int, default=0, help="evaluate every policy on N seeded rollouts")
    t.add_argument("--workers", type=int, default=1, help="rollout processes (default 1)")
    t.add_argument("--horizon", type=int, help="rollout steps before failure (default 250)")
    add_device(t, "cpu")
    add_job_config(t, "bc")
    add_options(t, BCConfig, "bc", title="behaviour cloning")
    t.set_defaults(_action=_train)

    e = sub.add_parser("eval", help="success rate of a policy over seeded rollouts, with a 95%% interval and a gif",
                       description="Roll a trained policy out on N scene seeds (from 10000, apart from demo seeds) "
                                   "in parallel processes; writes eval.json and rollout.gif.")
    e.add_argument("--policy", required=True, metavar="DIR", help="a policy folder (OUT/<name>/policy from train)")
    e.add_argument("--episodes", type=int, default=50)
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--task", help="default: the task the policy was trained on")
    e.add_argument("--seed", type=int, default=10_000)
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--horizon", type=int)
    e.set_defaults(_action=_eval)

    r = sub.add_parser("ppo", help="PPO (stable-baselines3) on frozen Toto features",
                       description="Reinforcement learning with Toto as a frozen feature extractor (the paper's "
                                   "simulation protocol), on Meta-World's dense reward.")
    r.add_argument("--task", required=True)
    add_model_source(r)
    r.add_argument("--layers", default=None, metavar="L[,L]", help="default: the last layer")
    r.add_argument("--context", type=int, default=1)
    r.add_argument("--steps", type=int, default=1_000_000, help="environment steps (default 1M)")
    r.add_argument("--n-steps", type=int, default=512, help="rollout length per PPO update")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--horizon", type=int, help="steps per episode (default 250)")
    r.add_argument("--resolution", type=int, default=128, help="camera image size (default 128)")
    add_device(r, "cpu")
    r.add_argument("--out", required=True, metavar="DIR")
    r.set_defaults(_action=_ppo)


def run(args) -> int:
    return args._action(args)


def _collect(args) -> int:
    from ..robot.demos import collect

    s = collect(args.task, args.episodes, args.out, seed=args.seed, max_attempts=args.max_attempts,
                horizon=args.horizon, resolution=args.resolution, progress=not args.no_progress)
    print(f"{s['episodes']} episodes of {s['task']} in {args.out} (expert success {s['expert_success_rate']:.1%} "
          f"over {s['attempts']} seeds)")
    return 0


def _videos(args) -> int:
    from ..robot.demos import export_videos

    paths = export_videos(args.demos, args.out, args.fps)
    print(f"{len(paths)} videos in {args.out}")
    return 0


def _model_layers(checkpoint: str) -> int:
    from ..train.checkpoint import read_checkpoint, resolve_checkpoint

    cfg, _, _ = read_checkpoint(resolve_checkpoint(checkpoint))
    return cfg.model.n_layers


def _train(args) -> int:
    from ..ioutil import atomic_write_json
    from ..robot.bc import BCConfig, train_policy
    from ..robot.demos import load_demos
    from ..robot.policy import PolicySpec, TotoEncoder

    if args.context < 1:
        raise ConfigError(f"--context must be >= 1, got {args.context}")
    if (args.checkpoint is None) != (args.tokenizer is None):
        raise ConfigError("--checkpoint and --tokenizer go together (the tokenizer the model was trained with)")
    if args.checkpoint is None and args.no_cnn:
        raise ConfigError("nothing to train: no --checkpoint and --no-cnn")
    out = Path(args.out)
    skipped: list = []
    episodes, info = load_demos(args.demos, args.camera, skipped=skipped)
    task = args.task or info.get("task")
    resolution = int(episodes[0].frames.shape[1])
    cfg = job_config(BCConfig, "bc", args)
    base = dict(context=args.context, proprio_dim=int(episodes[0].proprio.shape[1]),
                action_dim=int(episodes[0].actions.shape[1]), task=task, resolution=resolution)
    runs = []  # (name, spec, encoder)
    if args.checkpoint:
        bb = TotoEncoder.backbone(args.checkpoint, args.tokenizer, args.context, args.device)
        groups = _layer_groups(args.layers) if args.layers else [[bb.n_layers // 2], [bb.n_layers]]
        for which, (model, _) in bb.models(not args.no_random_init).items():
            kind = {"trained": "toto", "random_init": "toto-random"}[which]
            for g in groups:
                enc = TotoEncoder.of(bb, model, g, args.context)
                spec = PolicySpec(encoder=kind, feat_dim=enc.dim, layers=g, checkpoint=str(args.checkpoint),
                                  tokenizer=str(args.tokenizer), **base)
                runs.append((f"{kind}_L{'+'.join(map(str, g))}", spec, enc))
    if not args.no_cnn:
        from ..robot.policy import PixelCNN

        runs.append(("cnn", PolicySpec(encoder="cnn", feat_dim=PixelCNN(args.context).dim, **base), None))
    results = {"demos": str(args.demos), "format": info["format"], "episodes": len(episodes),
               "skipped_episodes": skipped, "task": task, "context": args.context, "bc": cfg.__dict__,
               "policies": {}}
    for name, spec, enc in runs:
        rep = train_policy(episodes, spec, out / name, cfg, args.cache or out / "features", enc,
                           progress=not args.no_progress)
        results["policies"][name] = {"final_loss": rep["final_loss"], "policy": str(out / name / "policy")}
        atomic_write_json(out / "results.json", results)
    if args.eval_episodes:
        from ..robot.evaluate import evaluate

        if not task:
            raise ConfigError("--eval-episodes needs a simulation task: these demos name none, give --task")
        for name, *_ in runs:
            ev = evaluate(out / name / "policy", args.eval_episodes, out / name / "eval", task=task,
                          workers=args.workers, horizon=args.horizon, progress=not args.no_progress)
            results["policies"][name].update({k: ev[k] for k in ("success_rate", "ci95", "successes", "episodes")})
            atomic_write_json(out / "results.json", results)
    for name, r in results["policies"].items():
        sr = f"  success {r['success_rate']:.0%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]" if "success_rate" in r else ""
        print(f"{name:24s} loss {r['final_loss']:.4f}{sr}")
    if skipped:
        print(f"skipped {len(skipped)} episode(s): " + "; ".join(s["reason"] for s in skipped[:3]))
    return 0


def _eval(args) -> int:
    from ..robot.evaluate import evaluate

    r = evaluate(args.policy, args.episodes, args.out, task=args.task, seed=args.seed, workers=args.workers,
                 horizon=args.horizon, progress=not args.no_progress)
    print(f"{r['task']}: success {r['successes']}/{r['episodes']} = {r['success_rate']:.1%} "
          f"(95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}); {args.out}/eval.json, rollout.gif")
    return 0


def _ppo(args) -> int:
    from ..robot.env import resolve_task
    from ..robot.rl import train_ppo

    layers = _layer_groups([args.layers])[0] if args.layers else [_model_layers(args.checkpoint)]
    r = train_ppo(resolve_task(args.task), args.checkpoint, args.tokenizer, layers, args.context, args.steps,
                  args.out, n_steps=args.n_steps, batch_size=args.batch_size, seed=args.seed, horizon=args.horizon,
                  resolution=args.resolution,
                  device=args.device)
    print(json.dumps({k: r[k] for k in ("task", "steps", "episodes")}))
    return 0
