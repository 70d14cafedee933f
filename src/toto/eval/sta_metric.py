"""Ego4D short-term object interaction anticipation (STA): the official top-K mAP and its checks.

The definitions follow the Ego4D forecasting code's ``STAMeanAveragePrecision`` (top_k=5,
IoU > 0.5, |TTC error| <= 0.25 s, classes without ground truth not counted) and the checks of its
``evaluate_short_term_anticipation_results.py``; the paper reports these four numbers
(arXiv 2501.05453, Table 7: Noun, Noun+Verb, Noun+TTC, Overall).

Per image, predictions are matched greedily from the highest score down: a prediction is a true
positive for a variant if some still unmatched ground-truth box satisfies the variant's criteria
(box IoU > 0.5 with the official "+1 pixel" box areas; same noun; same verb; TTC within 0.25 s),
and it takes the one with the highest IoU among those. The top-K criterion then drops, per image
and variant, the first (K-1) x (number of ground-truth objects) false positives in score order.
Average precision (VOC, monotone precision envelope) is computed per predicted/ground-truth noun
over all images and averaged over the nouns that have ground truth; a noun with ground truth and
no prediction scores 0.

One quirk of the official script is kept so that the numbers agree with it: an image whose
prediction list is empty contributes no ground truth (its objects are not counted as misses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.sta import load_json
from ..errors import DataError

CHALLENGE = "ego4d_short_term_object_interaction_anticipation"
VERSION = "1.0"
SHORT_NAMES = ("map_box_noun", "map_box_noun_verb", "map_box_noun_ttc", "map_box_noun_verb_ttc")
NAMES = ("Box + Noun mAP", "Box + Noun + Verb mAP", "Box + Noun + TTC mAP", "Box + Noun + Verb + TTC mAP")
PAPER_NAMES = ("Noun", "Noun+Verb", "Noun+TTC", "Overall")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[NA, NB] IoU of x1,y1,x2,y2 boxes with the official inclusive-pixel areas (w = x2 - x1 + 1)."""
    a = np.asarray(a, dtype=np.float64)[:, None, :]
    b = np.asarray(b, dtype=np.float64)[None, :, :]

    def area(x):
        return np.clip(x[..., 2] - x[..., 0] + 1, 0, None) * np.clip(x[..., 3] - x[..., 1] + 1, 0, None)

    inter = np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])], -1)
    ai = area(inter)
    return ai / (area(a) + area(b) - ai + 1e-11)


@dataclass
class Objects:
    """Boxes [N, 4] with their noun, verb, TTC and (for predictions) score, as arrays."""

    boxes: np.ndarray
    nouns: np.ndarray
    verbs: np.ndarray
    ttcs: np.ndarray
    scores: np.ndarray | None = None

    @classmethod
    def from_records(cls, records: list[dict], with_score: bool) -> "Objects":
        return cls(
            boxes=np.asarray([r["box"] for r in records], dtype=np.float64).reshape(-1, 4),
            nouns=np.asarray([r["noun_category_id"] for r in records], dtype=np.int64),
            verbs=np.asarray([r["verb_category_id"] for r in records], dtype=np.int64),
            ttcs=np.asarray([r["time_to_contact"] for r in records], dtype=np.float64),
            scores=np.asarray([r["score"] for r in records], dtype=np.float64) if with_score else None,
        )


def criteria(pred: Objects, i: int, gt: Objects, iou: np.ndarray, iou_threshold: float,
             ttc_threshold: float) -> np.ndarray:
    """[NG, 4] bool: which ground-truth objects prediction i may match, per variant."""
    box = iou > iou_threshold
    noun = pred.nouns[i] == gt.nouns
    verb = pred.verbs[i] == gt.verbs
    ttc = np.abs(pred.ttcs[i] - gt.ttcs) <= ttc_threshold
    bn = box & noun
    return np.stack([bn, bn & verb, bn & ttc, bn & verb & ttc], 1)


def match_image(pred: Objects, gt: Objects, top_k: int = 5, iou_threshold: float = 0.5,
                ttc_threshold: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: (scores, predicted nouns, true positives [NP, 4]) in descending score order; a
    true-positive entry is 1, 0, or NaN for a false positive the top-K criterion discounts."""
    order = pred.scores.argsort()[::-1]
    iou = box_iou(pred.boxes, gt.boxes)
    tp = np.zeros((len(order), 4))
    taken = np.zeros((len(gt.boxes), 4), dtype=bool)
    for i in order:
        ok = criteria(pred, i, gt, iou[i], iou_threshold, ttc_threshold) & ~taken
        overlaps = np.where(ok, iou[i][:, None], -1.0)
        best = overlaps.argmax(0)  # the highest-IoU admissible ground truth, per variant
        hit = ok[best, np.arange(4)]
        tp[i, hit] = 1
        taken[best[hit], np.arange(4)[hit]] = True
    tp = tp[order]
    if top_k > 1:
        fp = 1 - tp
        tp[(fp.cumsum(0) <= (top_k - 1) * len(gt.boxes)) & (fp == 1)] = np.nan
    return pred.scores[order], pred.nouns[order], tp


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """VOC average precision (monotone precision envelope, area where recall changes)."""
    tp = tp[scores.argsort()[::-1]]
    ctp = tp.cumsum()
    prec = ctp / np.arange(1, len(tp) + 1)
    rec = ctp / n_gt
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mpre[idx]))


def sta_map(pairs, top_k: int = 5, iou_threshold: float = 0.5, ttc_threshold: float = 0.25) -> dict:
    """The four mAPs (percent) over (prediction Objects or None, ground-truth Objects) pairs."""
    scores, nouns, tps, gt_nouns = [], [], [], []
    for pred, gt in pairs:
        if pred is None or len(pred.boxes) == 0:
            continue  # the official script counts no ground truth for an empty prediction list
        s, n, tp = match_image(pred, gt, top_k, iou_threshold, ttc_threshold)
        scores.append(s), nouns.append(n), tps.append(tp), gt_nouns.append(gt.nouns)
    if not scores:
        return {name: 0.0 for name in SHORT_NAMES}
    scores, nouns, tps, gt_nouns = (np.concatenate(x) for x in (scores, nouns, tps, gt_nouns))
    out = {}
    for v, name in enumerate(SHORT_NAMES):
        aps = []
        for c in np.unique(gt_nouns):
            sel = (nouns == c) & ~np.isnan(tps[:, v])
            n_gt = int(np.sum(gt_nouns == c))
            aps.append(100 * average_precision(tps[sel, v], scores[sel], n_gt) if sel.any() else 0.0)
        out[name] = float(np.mean(aps))
    return out


# --- the official script's input checks -------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_results(results, annotations: list[dict], where: str) -> None:
    """The official checks, in its order (plus: non-finite numbers are rejected)."""
    if not isinstance(results, dict):
        raise DataError(f"{where}: expected a JSON object with 'version', 'challenge', 'results'")
    for field in ("results", "version", "challenge"):
        if field not in results:
            raise DataError(f"{where}: missing '{field}' field in results JSON")
    if results["challenge"] != CHALLENGE:
        raise DataError(f"{where}: challenge '{results['challenge']}' not supported (expected '{CHALLENGE}')")
    if results["version"] != VERSION:
        raise DataError(f"{where}: version '{results['version']}' not supported (expected '{VERSION}')")
    if not isinstance(results["results"], dict):
        raise DataError(f"{where}: 'results' must map uid -> list of predictions")
    for uid, preds in results["results"].items():
        if not isinstance(preds, list):
            raise DataError(f"{where}: uid {uid}: predictions must be a list")
        for j, p in enumerate(preds):
            rec = f"{where}: uid {uid}, prediction {j}"
            if not isinstance(p, dict):
                raise DataError(f"{rec}: not an object")
            if "box" not in p:
                raise DataError(f"{rec}: missing 'box' property")
            box = p["box"]
            if not isinstance(box, list) or len(box) != 4 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in box):
                raise DataError(f"{rec}: invalid 'box' value {box!r} (4 numbers x1, y1, x2, y2)")
            for key, ok, kind in (("noun_category_id", _is_int, "an integer"),
                                  ("verb_category_id", _is_int, "an integer"),
                                  ("time_to_contact", lambda x: isinstance(x, float) and math.isfinite(x),
                                   "a finite float"),
                                  ("score", lambda x: isinstance(x, float) and math.isfinite(x), "a finite float")):
                if key not in p:
                    raise DataError(f"{rec}: missing '{key}' property")
                if not ok(p[key]):
                    raise DataError(f"{rec}: invalid '{key}' value {p[key]!r} (must be {kind})")
    missing = sorted({a["uid"] for a in annotations} - set(results["results"]))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"{where}: {len(missing)} annotated uids have no results: {shown}")


def validate_annotations(ann, where: str) -> list[dict]:
    """The annotated records (with ``uid`` and non-empty ``objects``) of an annotation file."""
    if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
        raise DataError(f"{where}: expected a JSON object with an 'annotations' list")
    records = ann["annotations"]
    for k, a in enumerate(records):
        rec = f"{where}: annotation {k}"
        if not isinstance(a, dict) or "uid" not in a:
            raise DataError(f"{rec}: missing 'uid'")
        rec = f"{where}: uid {a['uid']}"
        objs = a.get("objects")
        if not isinstance(objs, list) or not objs:
            raise DataError(f"{rec}: no 'objects' (an unannotated test file cannot be evaluated)")
        for j, o in enumerate(objs):
            for key in ("box", "noun_category_id", "verb_category_id", "time_to_contact"):
                if not isinstance(o, dict) or key not in o:
                    raise DataError(f"{rec}, object {j}: missing '{key}'")
            box = o["box"]
            if not isinstance(box, list) or len(box) != 4 or not all(isinstance(x, (int, float)) for x in box):
                raise DataError(f"{rec}, object {j}: invalid 'box' value {box!r}")
    return records


def evaluate_files(results_path: str | Path, annotations_path: str | Path, top_k: int = 5) -> dict:
    """``evaluate_short_term_anticipation_results.py RESULTS ANNOTATIONS``: the four mAPs."""
    annotations = validate_annotations(load_json(annotations_path, "annotations"), str(annotations_path))
    results = load_json(results_path, "results")
    validate_results(results, annotations, str(results_path))
    res = results["results"]
    pairs = []
    for a in annotations:
        preds = res[a["uid"]]
        pairs.append((Objects.from_records(preds, True) if preds else None,
                      Objects.from_records(a["objects"], False)))
    return sta_map(pairs, top_k=top_k)
