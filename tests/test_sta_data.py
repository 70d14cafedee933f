"""STA data: fake v1 and v2 releases (real mp4 clips, real JSON) read back with a missing clip, a
corrupt clip and a frame past a clip's end; the generator's TTC checked on the decoded pixels; bad
input one line naming file and record."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest

from toto.cli import main
from toto.data.sta import context_indices, load_examples, read_annotations, read_detections
from toto.synth.sta import HAND, make_sta_release
from toto.errors import DataError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("sta")
    v2 = make_sta_release(root / "v2", n_train=3, n_val=4, n_test=1, width=64, height=64, context=10,
                          max_ttc_frames=8, version="v2", seed=1)
    v1 = root / "v1"
    assert main(["synth", "sta", "--out", str(v1), "--train", "2", "--val", "2", "--test", "1",
                 "--width", "64", "--height", "64", "--context", "10", "--layout", "v1", "--seed", "2",
                 "--no-progress"]) == 0
    return v1, v2


def _decode_all(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_context_indices_clamp_at_zero():
    assert context_indices(10, 4, 3) == [1, 4, 7, 10]
    assert context_indices(2, 4, 2) == [0, 0, 0, 2]


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_reads_both_layouts_with_taxonomy_and_context(release, layout):
    root = release[0] if layout == "v1" else release[1]
    raw = json.loads((root / "annotations" / "fho_sta_val.json").read_text())
    split = read_annotations(root / "annotations" / "fho_sta_val.json")
    assert split.version == layout
    assert split.nouns == {c["id"]: c["name"] for c in raw["noun_categories"]}
    assert [r.uid for r in split.records] == [a["uid"] for a in raw["annotations"]]
    r, a = split.records[0], raw["annotations"][0]
    assert r.video_uid == a["video_uid" if layout == "v2" else "video_id"]
    assert (r.clip_frame, r.objects[0].ttc, list(r.objects[0].box)) == \
        (a["clip_frame"], a["objects"][0]["time_to_contact"], a["objects"][0]["box"])
    ex = load_examples(split, root / "clips", None, n_frames=4, stride=3, resolution=32)
    assert len(ex) == len(split.records) and ex[0].frames.shape == (4, 32, 32, 3) and ex[0].size == (64, 64)
    # the context frames are the clip's frames at those indices (decoded independently, resized)
    frames = _decode_all(root / "clips" / f"{r.clip_uid}.mp4")
    for got, i in zip(ex[0].frames, context_indices(r.clip_frame, 4, 3)):
        ref = av.VideoFrame.from_ndarray(frames[i], format="rgb24").reformat(
            width=32, height=32, format="rgb24", interpolation="AREA").to_ndarray()
        assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3  # yuv round trip only
    test = read_annotations(root / "annotations" / "fho_sta_test_unannotated.json")
    assert test.records[0].objects is None


def test_generated_ttc_is_when_the_hand_reaches_the_box(release):
    root = release[1]
    split = read_annotations(root / "annotations" / "fho_sta_train.json")
    for r in split.records:
        frames = _decode_all(root / "clips" / f"{r.clip_uid}.mp4")
        o = r.objects[0]
        contact = r.clip_frame + round(o.ttc * r.fps)
        centre = np.array([(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2])

        def hand_centre(i):
            ys, xs = np.nonzero(np.abs(frames[i].astype(int) - HAND.astype(int)).sum(-1) < 40)
            return np.array([xs.mean(), ys.mean()])

        # the hand's centre reaches the object's centre exactly at the contact frame, not before
        assert np.linalg.norm(hand_centre(contact) - centre) < 1.0
        assert np.linalg.norm(hand_centre(contact - 1) - centre) > 1.0


def test_missing_corrupt_and_past_end_are_counted_and_named(release, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(release[1], root)
    raw = json.loads((root / "annotations" / "fho_sta_val.json").read_text())
    recs = raw["annotations"]
    (root / "clips" / f"{recs[0]['clip_uid']}.mp4").unlink()
    (root / "clips" / f"{recs[1]['clip_uid']}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 500)
    recs[2]["clip_frame"] = 10_000
    (root / "annotations" / "fho_sta_val.json").write_text(json.dumps(raw))
    split = read_annotations(root / "annotations" / "fho_sta_val.json")
    dets = read_detections(root / "object_detections.json", split.nouns)
    ex = load_examples(split, root / "clips", dets, 4, 2, 32)
    assert [e.record.uid for e in ex] == [recs[3]["uid"]]
    assert split.skipped.items == {"missing clips": [f"{recs[0]['clip_uid']}.mp4"],
                                   "corrupt clips": [f"{recs[1]['clip_uid']}.mp4"],
                                   "frames past the clip end": [
                                       f"{recs[2]['clip_uid']}.mp4 frame 10000 ({recs[2]['uid']})"]}
    assert len(ex[0].detections) == len(json.loads((root / "object_detections.json").read_text())[recs[3]["uid"]])


def test_bad_input(release, tmp_path):
    src = release[1] / "annotations" / "fho_sta_val.json"
    raw = json.loads(src.read_text())
    p = tmp_path / "fho_sta_val.json"
    p.write_text("{\"annotations\": [")
    with pytest.raises(DataError, match="not valid JSON"):
        read_annotations(p)
    uid = raw["annotations"][1]["uid"]
    for key, value, msg in (("noun_category_id", 99, "unknown noun_category_id 99"),
                            ("verb_category_id", 7, "unknown verb_category_id 7"),
                            ("time_to_contact", "soon", "invalid time_to_contact")):
        bad = json.loads(json.dumps(raw))
        bad["annotations"][1]["objects"][0][key] = value
        p.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"{p}: uid {uid}, object 0: {msg}"):
            read_annotations(p)
    # boxes outside the frame: counted and skipped, the rest kept
    bad = json.loads(json.dumps(raw))
    bad["annotations"][1]["objects"][0]["box"] = [10, 10, 200, 30]
    p.write_text(json.dumps(bad))
    split = read_annotations(p)
    assert len(split.records) == len(raw["annotations"]) - 1
    assert split.skipped.items == {"boxes outside the frame or empty": [f"{uid} object 0"],
                                   "annotations without a usable object": [uid]}
    d = tmp_path / "det.json"
    d.write_text(json.dumps({"x": [{"box": [0, 0, 5, 5], "score": 0.5, "noun_category_id": 42}]}))
    with pytest.raises(DataError, match="uid x, detection 0: unknown noun_category_id 42"):
        read_detections(d, split.nouns)
