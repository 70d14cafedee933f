"""`toto anticipate`: Ego4D short-term object interaction anticipation (STA)."""

from __future__ import annotations

HELP = "Ego4D short-term anticipation: the official top-5 mAP, train, predict"


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ev = sub.add_parser("eval", help="the four official top-5 mAPs of a challenge results file",
                        description="Score a challenge-format results file against an STA annotation file "
                                    "(fho_sta_val.json) as the official evaluation script does.")
    ev.add_argument("results", help="results JSON: version '1.0', challenge "
                                    "'ego4d_short_term_object_interaction_anticipation', results {uid: [...]}")
    ev.add_argument("annotations", help="annotation JSON with 'annotations': [{uid, objects}]")
    ev.add_argument("--json", metavar="OUT", help="also write the four numbers here")
    from . import anticipate_predict, anticipate_train

    for name, mod in (("train", anticipate_train), ("predict", anticipate_predict)):
        q = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(q)
        q.set_defaults(_locks_out=mod.LOCKS_OUT)


def run(args) -> int:
    if args.action != "eval":
        from . import anticipate_predict, anticipate_train

        return {"train": anticipate_train, "predict": anticipate_predict}[args.action].run(args)
    from ..eval.sta_metric import NAMES, PAPER_NAMES, SHORT_NAMES, evaluate_files
    from ..ioutil import atomic_write_json

    scores = evaluate_files(args.results, args.annotations)
    for name, paper, key in zip(NAMES, PAPER_NAMES, SHORT_NAMES):
        print(f"{name} ({paper}): {scores[key]:0.2f}")
    if args.json:
        atomic_write_json(args.json, scores)
    return 0
