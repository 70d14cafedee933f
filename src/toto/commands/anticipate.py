"""`toto anticipate`: Ego4D short-term object interaction anticipation (STA)."""

from __future__ import annotations

HELP = "Ego4D short-term anticipation: the official top-5 mAP, generated STA data, train/predict"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ev = sub.add_parser("eval", help="the four official top-5 mAPs of a challenge results file",
                        description="Score a challenge-format results file against an STA annotation file "
                                    "(fho_sta_val.json) as the official evaluation script does.")
    ev.add_argument("results", help="results JSON: version '1.0', challenge "
                                    "'ego4d_short_term_object_interaction_anticipation', results {uid: [...]}")
    ev.add_argument("annotations", help="annotation JSON with 'annotations': [{uid, objects}]")
    ev.add_argument("--json", metavar="OUT", help="also write the four numbers here")
    for name in ("synth", "train", "predict"):
        mod = _action_module(name)
        if mod is not None:
            q = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
            mod.add_arguments(q)


def _action_module(name: str):
    import importlib

    try:
        return importlib.import_module(f"toto.commands.anticipate_{name}")
    except ModuleNotFoundError as e:
        if e.name != f"toto.commands.anticipate_{name}":
            raise
        return None


def run(args) -> int:
    if args.action != "eval":
        return _action_module(args.action).run(args)
    from ..eval.sta_metric import NAMES, PAPER_NAMES, SHORT_NAMES, evaluate_files
    from ..ioutil import atomic_write_json

    scores = evaluate_files(args.results, args.annotations)
    for name, paper, key in zip(NAMES, PAPER_NAMES, SHORT_NAMES):
        print(f"{name} ({paper}): {scores[key]:0.2f}")
    if args.json:
        atomic_write_json(args.json, scores)
    return 0
