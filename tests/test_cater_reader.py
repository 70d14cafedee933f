"""The CATER reader on a fake release built here (real .avi files, CATER's list and scene
formats, a missing and a corrupt video), the last-window sampling, and the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toto.data.cater import cater_lists, default_stride, scene_summary
from toto.errors import DataError
from toto.eval.cater import localization_metrics, oracle_metrics
from toto.eval.features import SequenceSpec, read_frames


def write_avi(path, n_frames: int, size: int = 32) -> None:
    """Frame i is a flat grey of level 6 * i (its index, readable back after compression)."""
    import av

    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=24)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.bit_rate = 4_000_000
        for i in range(n_frames):
            img = np.full((size, size, 3), 6 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def cater_scene(snitch_path: dict[int, tuple], movements: dict) -> dict:
    """A scene file in the release's format: snitch locations for every frame 0..300."""
    locs, cur = {}, None
    for f in range(301):
        cur = snitch_path.get(f, cur)
        locs[str(f)] = [cur[0], cur[1], 0.3]
    return {"objects": [{"shape": "spl", "instance": "Spl_0", "locations": locs},
                        {"shape": "cone", "instance": "Cone_1", "locations": {}},
                        {"shape": "cone", "instance": "Cone_2", "locations": {}}],
            "movements": movements}


@pytest.fixture
def release(tmp_path):
    root = tmp_path / "max2action"
    (root / "videos").mkdir(parents=True)
    (root / "scenes").mkdir()
    (root / "lists" / "localize").mkdir(parents=True)
    for i in (1, 2, 3, 6, 8):
        write_avi(root / "videos" / f"CATER_new_{i:06d}.avi", 31)
    write_avi(root / "videos" / "CATER_new_000007.avi", 10)  # too short for 4 frames at stride 10
    (root / "videos" / "CATER_new_000005.avi").write_bytes(b"RIFF\x00\x00not an avi at all" * 50)  # corrupt
    (root / "lists" / "localize" / "train.txt").write_text(
        "CATER_new_000001.avi 33\nCATER_new_000002.avi 0\nCATER_new_000004.avi 7\n"  # 4: missing
        "CATER_new_000005.avi 8\nCATER_new_000003.avi 35\n")
    (root / "lists" / "localize" / "val.txt").write_text(
        "CATER_new_000006.avi 35\nCATER_new_000008.avi 36\nCATER_new_000007.avi 33\n"  # 8: label out of range
        "CATER_new_000003.avi 14\n")  # no train video in cell 14
    # video 1: medium cone covers the snitch at 50, the large cone covers both at 100, the large one
    # is lifted away at 150, the medium cone then slides the hidden snitch from cell 14 to cell 33
    (root / "scenes" / "CATER_new_000001.json").write_text(json.dumps(cater_scene(
        {0: (-0.5, -0.5), 200: (-0.5, -0.5), 230: (0.5, 2.5)},
        {"Cone_1": [["_contain", "Spl_0", 30, 50], ["_slide", None, 200, 230]],
         "Cone_2": [["_contain", "Cone_1", 80, 100], ["_pick_place", None, 150, 175]],
         "Spl_0": [["_slide", None, 200, 230]]})))
    # video 2: covered at 50, released at 150 (lifted), then the snitch slides to cell 0
    (root / "scenes" / "CATER_new_000002.json").write_text(json.dumps(cater_scene(
        {0: (1.5, 1.5), 200: (1.5, 1.5), 230: (-2.5, -2.5)},
        {"Cone_1": [["_contain", "Spl_0", 30, 50], ["_pick_place", None, 150, 170]],
         "Spl_0": [["_slide", None, 200, 230]]})))
    return root


def test_reader_counts_and_names_every_left_out_video(release, tmp_path):
    out = tmp_path / "lists"
    s = cater_lists(release, out, frames=4, stride=10, progress=False)
    train = (out / "train.txt").read_text().splitlines()
    assert [(l.split("\t")[0].rsplit("/", 1)[1], l.split("\t")[1]) for l in train] == [
        ("CATER_new_000001.avi", "33"), ("CATER_new_000002.avi", "0"), ("CATER_new_000003.avi", "35")]
    val = (out / "val.txt").read_text().splitlines()
    assert len(val) == 1 and val[0].endswith("CATER_new_000006.avi\t35")
    assert s["splits"]["train"] == {"rows": 5, "kept": 3, "missing": 1, "unreadable": 1, "short": 0, "bad_label": 0,
                                       "label_not_in_train": 0}
    assert s["splits"]["val"] == {"rows": 4, "kept": 1, "missing": 0, "unreadable": 0, "short": 1, "bad_label": 1,
                                  "label_not_in_train": 1}
    rep = json.loads((out / "train.txt.report.json").read_text())
    assert rep["missing"]["items"][0].endswith("CATER_new_000004.avi")
    assert rep["unreadable"]["items"][0].endswith("CATER_new_000005.avi")
    rep = json.loads((out / "val.txt.report.json").read_text())
    assert "CATER_new_000008.avi" in rep["bad_label"]["items"][0] and rep["short"]["items"][0].endswith("000007.avi")
    assert "CATER_new_000003.avi label 14" in rep["label_not_in_train"]["items"][0]
    videos = {k.rsplit("/", 1)[1]: v for k, v in json.loads((out / "cater.json").read_text())["videos"].items()}
    assert videos["CATER_new_000001.avi"] == {"split": "train", "label": 33, "hidden": True, "last_seen_cell": 14,
                                              "container": "Cone_1"}
    assert videos["CATER_new_000002.avi"]["hidden"] is False and videos["CATER_new_000002.avi"]["last_seen_cell"] == 0
    assert "hidden" not in videos["CATER_new_000003.avi"]  # no scene file


def test_reader_bad_input(release, tmp_path, capsys):
    from toto.cli import main

    (release / "lists" / "localize" / "val.txt").write_text("CATER_new_000006.avi 14 extra\n")
    assert main(["lists", "cater", "--root", str(release), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val.txt:1" in err[0]
    with pytest.raises(DataError, match="no videos/"):
        cater_lists(tmp_path, tmp_path / "o", 4, 10)
    (release / "lists" / "localize" / "val.txt").write_text("CATER_new_000004.avi 33\n")  # only a missing video
    with pytest.raises(DataError, match="no usable video.*1 missing"):
        cater_lists(release, tmp_path / "o", 4, 10, progress=False)


def test_cli_default_stride_and_last_window(release, tmp_path, capsys):
    from toto.cli import main

    assert main(["lists", "cater", "--root", str(release), "--out", str(tmp_path / "o"), "--frames", "4",
                 "--no-progress"]) == 0
    assert "stride 10" in capsys.readouterr().out  # (31 - 1) // 3
    assert default_stride(301, 16) == 20 and default_stride(301, 32) == 9
    frames = read_frames(release / "videos" / "CATER_new_000001.avi", SequenceSpec("video", 4, 7, "last"), 16)
    levels = frames.reshape(4, -1).mean(1) / 6  # the window ends at the last frame (30)
    assert np.allclose(levels, [9, 16, 23, 30], atol=0.7)
    short = read_frames(release / "videos" / "CATER_new_000007.avi", SequenceSpec("video", 4, 4, "last"), 16)
    assert np.allclose(short.reshape(4, -1).mean(1) / 6, [1, 1, 5, 9], atol=0.7)  # padded with its first kept


def test_metrics_by_hand():
    scores = np.zeros((4, 36))
    scores[0, [7, 0]] = [2, 1]  # first guess 7 (label 7): right, L1 0
    scores[1, [0, 1, 2, 3, 4, 35]] = [6, 5, 4, 3, 2, 1]  # label 35 is 6th: top-5 miss, L1 from 0 to 35 = 10
    scores[2, [14, 21]] = [1, 2]  # guess 21 (row 3, col 3), label 14 (row 2, col 2): L1 2, top-5 hit
    scores[3, 5] = 1  # guess 5, label 5
    m = localization_metrics(scores, [7, 35, 14, 5], [True, True, False, None])
    assert m["all"] == {"n": 4, "top1": 0.5, "top5": 0.75, "l1": 3.0}
    assert m["hidden"] == {"n": 2, "top1": 0.5, "top5": 0.5, "l1": 5.0}
    assert m["visible"] == {"n": 1, "top1": 0.0, "top5": 1.0, "l1": 2.0}
    o = oracle_metrics([{"label": 33, "hidden": True, "last_seen_cell": 14},
                        {"label": 0, "hidden": False, "last_seen_cell": 0}, {"label": 3}])
    assert o["all"] == {"n": 2, "top1": 0.5, "top5": None, "l1": 2.0}  # 14 -> 33: 3 rows + 1 column
    assert o["visible"]["top1"] == 1.0 and o["hidden"]["top1"] == 0.0


def test_scene_summary_of_a_generated_scene():
    scene = {"objects": [{"shape": "spl", "instance": "Spl_0",
                          "locations": {"0": [0.5, 0.5, 0.22], "150": [-2.5, 0.5, 0.22], "300": [2.5, 2.5, 0.22]}}],
             "frame_ids": [0, 150, 300], "snitch_covered": [False, True, True], "container_last": "Cone_1"}
    assert scene_summary(scene) == {"hidden": True, "last_seen_cell": 21, "container": "Cone_1"}
