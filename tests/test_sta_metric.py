"""The Ego4D STA top-5 mAP: hand-built cases, agreement with a literal transcription of the official
computation on random cases, and the official script's input checks through `toto anticipate eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toto.cli import main
from toto.eval.sta_metric import CHALLENGE, SHORT_NAMES, Objects, box_iou, evaluate_files, sta_map


# --- reference: the official STAMeanAveragePrecision, transcribed statement by statement ---------

def _ref_iou(preds, gts):
    preds = np.expand_dims(preds, 1)
    gts = np.expand_dims(gts, 0)

    def area(boxes):
        width = boxes[..., 2] - boxes[..., 0] + 1
        height = boxes[..., 3] - boxes[..., 1] + 1
        width[width < 0] = 0
        height[height < 0] = 0
        return width * height

    ixmin = np.maximum(gts[..., 0], preds[..., 0])
    iymin = np.maximum(gts[..., 1], preds[..., 1])
    ixmax = np.minimum(gts[..., 2], preds[..., 2])
    iymax = np.minimum(gts[..., 3], preds[..., 3])
    ai = area(np.stack([ixmin, iymin, ixmax, iymax], -1))
    return ai / (area(preds) + area(gts) - ai + 1e-11)


class _RefSTAMap:
    def __init__(self, K=5, iou_threshold=0.5, ttc_threshold=0.25):
        self.true_positives, self.confidence_scores, self.predicted_classes, self.gt_classes = [], [], [], []
        self.K, self.iou_threshold, self.ttc_threshold, self.num_aps = K, iou_threshold, ttc_threshold, 4

    def _map_classes(self, preds):
        return np.vstack([preds["nouns"]] * 4).T

    def _match(self, pred, gt, ious):
        nouns = pred["nouns"] == gt["nouns"]
        boxes = ious.ravel() > self.iou_threshold
        verbs = pred["verbs"] == gt["verbs"]
        ttcs = np.abs(pred["ttcs"] - gt["ttcs"]) <= self.ttc_threshold
        return np.vstack([boxes & nouns, boxes & verbs & nouns, boxes & nouns & ttcs,
                          boxes & verbs & nouns & ttcs]).T

    def add(self, preds, labels):
        if len(preds) > 0:
            predicted_boxes, predicted_scores = preds["boxes"], preds["scores"]
            predicted_classes = self._map_classes(preds)
            true_positives = np.zeros((len(predicted_boxes), self.num_aps))
            if len(labels) > 0:
                ious = _ref_iou(predicted_boxes, labels["boxes"])
                gt_matched = np.zeros((len(labels["boxes"]), self.num_aps))
                for i in predicted_scores.argsort()[::-1]:
                    overlaps = ious[i].reshape(-1, 1)
                    matchings = self._match({k: p[i] for k, p in preds.items()}, labels, overlaps)
                    overlaps = np.tile(overlaps, [1, matchings.shape[1]])
                    matchings[gt_matched == 1] = 0
                    overlaps[matchings == 0] = -1
                    jj = overlaps.argmax(0)
                    i_matchings = matchings[jj, range(len(jj))]
                    true_positives[i, i_matchings] = 1
                    gt_matched[jj, range(len(jj))] += i_matchings
                if self.K is not None and self.K > 1:
                    K = (self.K - 1) * len(labels["boxes"])
                    order = predicted_scores.argsort()[::-1]
                    sorted_tp = (true_positives[order, :]).astype(float)
                    sorted_fp = 1 - sorted_tp
                    sorted_tp[(sorted_fp.cumsum(0) <= K) & (sorted_fp == 1)] = np.nan
                    true_positives = sorted_tp
                    predicted_scores = predicted_scores[order]
                    predicted_classes = predicted_classes[order]
                self.gt_classes.append(self._map_classes(labels))
            self.true_positives.append(true_positives)
            self.confidence_scores.append(predicted_scores)
            self.predicted_classes.append(predicted_classes)

    @staticmethod
    def _compute_ap(prec, rec):
        mrec = np.concatenate(([0], rec, [1]))
        mpre = np.concatenate(([0], prec, [0]))
        for i in range(len(mpre) - 2, 0, -1):
            mpre[i] = np.max((mpre[i], mpre[i + 1]))
        i = np.where(mrec[1:] != mrec[:-1])[0] + 1
        return np.sum((mrec[i] - mrec[i - 1]) * mpre[i])

    def evaluate(self):
        gt_classes = np.concatenate(self.gt_classes)
        predicted_classes = np.concatenate(self.predicted_classes)
        true_positives = np.concatenate(self.true_positives)
        confidence_scores = np.concatenate(self.confidence_scores)
        metrics = []
        for i in range(self.num_aps):
            measures = []
            _gt, _pc, _tp = gt_classes[:, i], predicted_classes[:, i], true_positives[:, i]
            for c in np.unique(_gt):
                tp, cs, ngt = _tp[_pc == c], confidence_scores[_pc == c], np.sum(_gt == c)
                if len(tp) > 0:
                    valid = ~np.isnan(tp)
                    tp, cs = tp[valid], cs[valid]
                if len(tp) > 0 and ngt > 0:
                    tps = tp[cs.argsort()[::-1]]
                    ctp, cfp = tps.cumsum(), (1 - tps).cumsum()
                    measures.append(self._compute_ap(ctp / (ctp + cfp), ctp / ngt) * 100)
                elif not (len(tp) == 0 and ngt == 0):
                    measures.append(0)
            metrics.append(np.mean(measures))
        return tuple(metrics)


def _reference(annotations, results):
    m = _RefSTAMap()
    for ann in annotations:
        gt = {"boxes": np.vstack([x["box"] for x in ann["objects"]]),
              "nouns": np.array([x["noun_category_id"] for x in ann["objects"]]),
              "verbs": np.array([x["verb_category_id"] for x in ann["objects"]]),
              "ttcs": np.array([x["time_to_contact"] for x in ann["objects"]])}
        p = results[ann["uid"]]
        pred = {"boxes": np.vstack([x["box"] for x in p]), "nouns": np.array([x["noun_category_id"] for x in p]),
                "verbs": np.array([x["verb_category_id"] for x in p]),
                "ttcs": np.array([x["time_to_contact"] for x in p]),
                "scores": np.array([x["score"] for x in p])} if p else {}
        m.add(pred, gt)
    return dict(zip(SHORT_NAMES, m.evaluate()))


# --- helpers ----------------------------------------------------------------------------------

def _obj(box, noun, verb, ttc, score=None):
    d = {"box": [float(x) for x in box], "noun_category_id": int(noun), "verb_category_id": int(verb),
         "time_to_contact": float(ttc)}
    if score is not None:
        d["score"] = float(score)
    return d


def _score(annotations, results):
    return sta_map([(Objects.from_records(results[a["uid"]], True) if results[a["uid"]] else None,
                     Objects.from_records(a["objects"], False)) for a in annotations])


GT = [{"uid": "a", "objects": [_obj([10, 10, 49, 49], 1, 2, 0.5), _obj([60, 60, 99, 99], 3, 0, 1.0)]},
      {"uid": "b", "objects": [_obj([0, 0, 19, 39], 1, 1, 2.0)]}]


def _perfect():
    return {a["uid"]: [dict(o, score=0.9) for o in a["objects"]] for a in GT}


def test_perfect_predictions_score_100_everywhere():
    assert _score(GT, _perfect()) == {k: 100.0 for k in SHORT_NAMES}


def test_wrong_verb_drops_noun_verb_and_overall_only():
    res = _perfect()
    res["b"][0]["verb_category_id"] = 7
    s = _score(GT, res)
    # noun 1 has 2 GT (a: tp, b: now a miss for the verb variants); noun 3 stays perfect.
    # noun 1 verb variants: one TP at recall 0.5, precision 1 -> AP 50; mean over nouns (50 + 100) / 2
    assert s == {"map_box_noun": 100.0, "map_box_noun_verb": 75.0, "map_box_noun_ttc": 100.0,
                 "map_box_noun_verb_ttc": 75.0}


def test_ttc_off_by_0_3_drops_noun_ttc_and_overall_only():
    res = _perfect()
    res["a"][1]["time_to_contact"] = 1.0 + 0.3  # noun 3's only object
    s = _score(GT, res)
    assert s == {"map_box_noun": 100.0, "map_box_noun_verb": 100.0, "map_box_noun_ttc": 50.0,
                 "map_box_noun_verb_ttc": 50.0}
    res["a"][1]["time_to_contact"] = 1.0 + 0.25  # the bound is inclusive
    assert _score(GT, res)["map_box_noun_ttc"] == 100.0


def test_iou_threshold_is_strict():
    # gt 0..99 (100 px, inclusive areas), prediction 0..w-1: IoU = w/100
    gt = [{"uid": "u", "objects": [_obj([0, 0, 99, 0], 0, 0, 1.0)]}]
    for w, expected in ((49, 0.0), (50, 0.0), (51, 100.0)):
        res = {"u": [_obj([0, 0, w - 1, 0], 0, 0, 1.0, 0.8)]}
        assert box_iou(np.array([res["u"][0]["box"]]), np.array([gt[0]["objects"][0]["box"]]))[0, 0] == \
            pytest.approx(w / 100)
        assert _score(gt, res)["map_box_noun"] == expected


def test_top5_discounts_four_false_positives_per_object():
    gt = [{"uid": "u", "objects": [_obj([0, 0, 9, 9], 0, 0, 1.0)]}]
    fps = [_obj([50 + i, 50, 60 + i, 60], 0, 0, 1.0, 0.9 - 0.01 * i) for i in range(5)]
    hit = _obj([0, 0, 9, 9], 0, 0, 1.0, 0.1)
    # 4 higher-scored false positives are forgiven: AP 100
    assert _score(gt, {"u": fps[:4] + [hit]})["map_box_noun"] == 100.0
    # a 5th one is not: the hit comes second -> precision 1/2 at recall 1
    assert _score(gt, {"u": fps + [hit]})["map_box_noun"] == 50.0


def test_nouns_without_ground_truth_do_not_count_and_missing_noun_scores_zero():
    gt = [{"uid": "u", "objects": [_obj([0, 0, 9, 9], 0, 0, 1.0), _obj([20, 20, 29, 29], 1, 0, 1.0)]}]
    res = {"u": [_obj([0, 0, 9, 9], 0, 0, 1.0, 0.9), _obj([40, 40, 49, 49], 5, 0, 1.0, 0.8)]}
    assert _score(gt, res)["map_box_noun"] == 50.0  # noun 0: 100, noun 1: 0, noun 5 ignored


def test_agrees_with_official_transcription_on_random_cases():
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(30):
        anns, res = [], {}
        for k in range(int(rng.integers(1, 8))):
            n_gt = int(rng.integers(1, 4))
            boxes = []
            for _ in range(n_gt):
                x, y = rng.uniform(0, 200, 2)
                boxes.append([x, y, x + rng.uniform(10, 80), y + rng.uniform(10, 80)])
            objs = [_obj(b, rng.integers(0, 4), rng.integers(0, 3), rng.uniform(0, 2)) for b in boxes]
            anns.append({"uid": f"u{k}", "objects": objs})
            preds = []
            for _ in range(int(rng.integers(0, 12))):
                src = objs[int(rng.integers(n_gt))]
                b = np.array(src["box"]) + rng.normal(0, 8, 4)
                preds.append(_obj(b, src["noun_category_id"] if rng.random() < 0.7 else rng.integers(0, 4),
                                  src["verb_category_id"] if rng.random() < 0.6 else rng.integers(0, 3),
                                  src["time_to_contact"] + rng.normal(0, 0.3), rng.random()))
            res[f"u{k}"] = preds
        if not any(res.values()):
            continue
        ours, ref = _score(anns, res), _reference(anns, res)
        seen.add(tuple(round(v, 6) for v in ours.values()))
        for k in SHORT_NAMES:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9), (trial, k)
    assert len(seen) > 20  # the cases differ: not all 0 or 100


# --- the command and its checks ----------------------------------------------------------------

def _write(tmp_path, results, annotations=None):
    r, a = tmp_path / "results.json", tmp_path / "ann.json"
    r.write_text(json.dumps(results))
    a.write_text(json.dumps({"annotations": GT} if annotations is None else annotations))
    return r, a


def test_cli_eval_prints_and_writes_the_official_names(tmp_path, capsys):
    res = _perfect()
    res["b"][0]["verb_category_id"] = 7
    r, a = _write(tmp_path, {"version": "1.0", "challenge": CHALLENGE, "results": res})
    assert main(["anticipate", "eval", str(r), str(a), "--json", str(tmp_path / "out.json")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == {"map_box_noun": 100.0, "map_box_noun_verb": 75.0, "map_box_noun_ttc": 100.0,
                   "map_box_noun_verb_ttc": 75.0}
    text = capsys.readouterr().out
    assert "Box + Noun + Verb + TTC mAP (Overall): 75.00" in text


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("version"), "missing 'version'"),
    (lambda d: d.update(challenge="ego4d_lta"), "challenge 'ego4d_lta' not supported"),
    (lambda d: d.update(version="2.0"), "version '2.0' not supported"),
    (lambda d: d["results"].pop("b"), "have no results: b"),
    (lambda d: d["results"]["a"][0].pop("box"), "uid a, prediction 0: missing 'box'"),
    (lambda d: d["results"]["a"][0].update(box=[1, 2, 3]), "invalid 'box'"),
    (lambda d: d["results"]["a"][0].update(noun_category_id=1.0), "invalid 'noun_category_id'"),
    (lambda d: d["results"]["a"][0].update(time_to_contact=1), "invalid 'time_to_contact'"),
    (lambda d: d["results"]["a"][1].pop("score"), "uid a, prediction 1: missing 'score'"),
])
def test_cli_eval_rejects_bad_results_in_one_line(tmp_path, capsys, mutate, message):
    d = {"version": "1.0", "challenge": CHALLENGE, "results": _perfect()}
    mutate(d)
    r, a = _write(tmp_path, d)
    assert main(["anticipate", "eval", str(r), str(a)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and str(r) in err


def test_cli_eval_bad_files(tmp_path, capsys):
    r, a = _write(tmp_path, {"version": "1.0", "challenge": CHALLENGE, "results": _perfect()})
    a.write_text("{not json")
    assert main(["anticipate", "eval", str(r), str(a)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    a.write_text(json.dumps({"annotations": [{"uid": "a"}]}))
    assert main(["anticipate", "eval", str(r), str(a)]) == 2
    assert "uid a: no 'objects'" in capsys.readouterr().err


def test_evaluate_files_matches_reference_with_empty_prediction_lists(tmp_path):
    res = _perfect()
    res["b"] = []  # the official script then counts none of b's ground truth
    r, a = _write(tmp_path, {"version": "1.0", "challenge": CHALLENGE, "results": res})
    assert evaluate_files(r, a) == pytest.approx(_reference(GT, res))
