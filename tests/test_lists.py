"""`toto lists`: tiny fake ImageNet (Kaggle CSV and devkit) and Kinetics distributions built here,
their list files checked against an independent parse of the annotations, read back by
scan_dataset and by a short `toto probe` run; missing media counted; bad input one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from test_probe import _tiny_setup  # a patch tokenizer (16 px, 4 codes per frame) and a tiny checkpoint

from toto.cli import main
from toto.data.lists import scan_dataset

WNIDS = ["n01440764", "n01443537", "n01484850"]


def _read_tsv(path: Path) -> list[tuple[Path, str]]:
    """The list file as (absolute path, label), read without toto's reader."""
    out = []
    for line in path.read_text().splitlines():
        p, label = line.split("\t")
        p = Path(p)
        out.append(((p if p.is_absolute() else path.parent / p).resolve(), label))
    return out


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    img = np.clip(value + rng.normal(0, 15, (20, 24, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, format="JPEG")


def _imagenet(tmp_path: Path) -> dict:
    """A train folder of class folders and a flat val folder of 8 images labelled in Kaggle's
    CSV (rows shuffled, boxes after the synset); image 5 was never downloaded and one stray file
    has no annotation."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            _jpeg(root / "train" / wnid / f"{wnid}_{i}.JPEG", 40 + 80 * c + i)
    labels = {i: WNIDS[int(rng.integers(3))] for i in range(1, 9)}
    for i, wnid in labels.items():
        if i != 5:
            _jpeg(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 40 + 80 * WNIDS.index(wnid))
    _jpeg(root / "val" / "stray.JPEG", 0)
    lines = ["ImageId,PredictionString"]
    for i in rng.permutation(list(labels)):
        w = labels[int(i)]
        lines.append(f"ILSVRC2012_val_{int(i):08d},{w} 1 2 30 40 {w} 5 6 7 8 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "labels": labels, "csv": root / "LOC_val_solution.csv"}


def _expected_val(fake: dict) -> list[tuple[Path, str]]:
    """Independent parse of the CSV: row order, files that exist only."""
    out = []
    for line in fake["csv"].read_text().splitlines()[1:]:
        image_id, pred = line.split(",")
        p = fake["root"] / "val" / f"{image_id}.JPEG"
        if p.exists():
            out.append((p.resolve(), pred.split()[0]))
    return out


def _write_meta(path: Path, leaves: list[str]) -> None:
    """A devkit-like meta.mat: a (n, 1) struct array `synsets`, leaves with ids 1..len(leaves) in
    a shuffled order, then non-leaf synsets with larger ids and children lists, as the real one."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i + 1, w, f"class {w}", "gloss", 0, np.zeros((1, 0), np.uint8), 0, 1300) for i, w in enumerate(leaves)]
    rows = [rows[i] for i in (2, 0, 1)] + [
        (1001, "n09999999", "fish, parent", "gloss", 2, np.array([[1, 2]], np.uint16), 1, 0),
        (1002, "n00001740", "entity", "gloss", 1, np.array([[1001]], np.uint16), 2, 0)]
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        synsets[i, 0] = r
    scipy.io.savemat(path, {"synsets": synsets})


def test_imagenet_solution_csv_and_devkit(tmp_path, capsys):
    fake = _imagenet(tmp_path)
    root = fake["root"]
    out = root / "val.txt"
    assert main(["lists", "imagenet", "--val-dir", str(root / "val"), "--solution", str(fake["csv"]),
                 "--train-dir", str(root / "train"), "--out", str(out), "--no-progress"]) == 0
    expected = _expected_val(fake)
    assert _read_tsv(out) == expected and len(expected) == 7
    assert out.read_text().splitlines()[0].startswith("val/ILSVRC2012_val_")  # relative under ROOT
    rep = json.loads((root / "val.txt.report.json").read_text())
    assert (rep["rows"], rep["listed"], rep["missing"], rep["unlabelled_files"]) == (8, 7, 1, 1)
    assert rep["missing_items"] == ["ILSVRC2012_val_00000005"]
    assert rep["per_class"] == {w: sum(1 for _, l in expected if l == w) for w in sorted({l for _, l in expected})}
    printed = capsys.readouterr().out
    assert "7 samples" in printed and "missing" in printed

    # the devkit gives the same list: ground truth = ids into meta.mat, line i labels image i
    gt = root / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{WNIDS.index(fake['labels'][i]) + 1}\n" for i in range(1, 9)))
    _write_meta(root / "meta.mat", WNIDS)
    out2 = tmp_path / "devkit" / "val.txt"
    assert main(["lists", "imagenet", "--val-dir", str(root / "val"), "--ground-truth", str(gt),
                 "--meta", str(root / "meta.mat"), "--out", str(out2), "--no-progress"]) == 0
    by_devkit = _read_tsv(out2)
    assert sorted(by_devkit) == sorted(expected)
    assert [p.name for p, _ in by_devkit] == sorted(p.name for p, _ in expected)  # ground-truth order
    assert Path(out2.read_text().split("\t")[0]).is_absolute()  # media outside the list's folder

    # probe's reader: train class folders + the generated val list
    ds = scan_dataset(root)
    assert ds.classes == WNIDS and ds.kind == "image"
    assert [(s.path.resolve(), ds.classes[s.label]) for s in ds.splits["val"]] == expected
    assert len(ds.splits["train"]) == 9


def test_probe_runs_on_generated_imagenet_list(tmp_path):
    fake = _imagenet(tmp_path)
    root = fake["root"]
    assert main(["lists", "imagenet", "--val-dir", str(root / "val"), "--solution", str(fake["csv"]),
                 "--out", str(root / "val.txt"), "--no-progress"]) == 0
    _, tok, run = _tiny_setup(tmp_path)
    assert main(["probe", "--checkpoint", str(run), "--tokenizer", str(tok), "--data", str(root),
                 "--out", str(tmp_path / "probe"), "--layers", "1", "--pooling", "average", "--epochs", "1",
                 "--no-progress"]) == 0
    rep = json.loads((tmp_path / "probe" / "results.json").read_text())
    m = rep["models"]["trained"]
    assert rep["n_classes"] == 3 and (m["n_train"], m["n_val"]) == (9, 7)
    assert m["skipped"]["val"] == [] and 0 <= m["layers"]["1"]["average"]["top1"] <= 1


# -- Kinetics -----------------------------------------------------------------------------------

CLASSES = ["air drumming", "passing American football (in game)"]


def _clip(path: Path, value: int) -> None:
    from toto.data.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    frames = np.clip(value + rng.normal(0, 10, (4, 16, 16, 3)), 0, 255).astype(np.uint8)
    write_video(frames, path, fps=4)


def _kinetics(tmp_path: Path) -> dict:
    """validate.csv (k700-2020 columns) and train.csv with youtube ids holding '-' and '_'; on disk
    some clips are missing, one is empty, one lies in a class folder of a second download folder,
    one is an .mkv and one has unpadded times; train.csv repeats one row."""
    root = tmp_path / "k"
    header = "label,youtube_id,time_start,time_end,split,is_cc"
    rows = {"train": [], "validate": []}
    for split, n in (("train", 4), ("validate", 3)):
        for c, label in enumerate(CLASSES):
            for i in range(n):
                yid = f"-{split[0]}{c}{i}_x-Yz9"[:11].ljust(11, "q")
                rows[split].append((label, yid, 10 * i, 10 * i + 10))
    on_disk, missing = {}, set()
    for split, rs in rows.items():
        for j, (label, yid, s, e) in enumerate(rs):
            name = f"{yid}_{s:06d}_{e:06d}"
            if j % 4 == 3:
                missing.add(name)
                continue
            value = 60 + 120 * CLASSES.index(label) + j
            if split == "train" and j == 1:
                p = tmp_path / "more" / label / f"{name}.mkv"
            elif split == "train" and j == 2:
                p = root / split / f"{yid}_{s}_{e}.mp4"
            else:
                p = root / split / f"{name}.mp4"
            _clip(p, value)
            on_disk[name] = p
    empty = rows["validate"][0]
    empty_name = f"{empty[1]}_{empty[2]:06d}_{empty[3]:06d}"
    on_disk[empty_name].write_bytes(b"")
    for split, rs in rows.items():
        lines = [header] + [f'"{l}",{y},{s},{e},{split},0' for l, y, s, e in rs]
        if split == "train":
            lines.append(lines[1])
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return {"root": root, "rows": rows, "on_disk": on_disk, "missing": missing, "empty": empty_name}


def test_kinetics_lists_read_by_scan_and_features(tmp_path, capsys):
    from toto.eval.backbone import check_compatible
    from toto.eval.features import FeatureExtractor, SequenceSpec
    from toto.tokenizers.base import get_tokenizer
    from toto.train.checkpoint import load_model

    fake = _kinetics(tmp_path)
    root = fake["root"]
    for split, name in (("train", "train"), ("validate", "val")):
        assert main(["lists", "kinetics", "--csv", str(root / f"{split}.csv"), "--videos", str(root / split),
                     "--videos", str(tmp_path / "more"), "--out", str(root / f"{name}.txt"), "--no-progress"]) == 0
        expected = []
        for label, yid, s, e in fake["rows"][split]:
            name_ = f"{yid}_{s:06d}_{e:06d}"
            if name_ in fake["on_disk"] and name_ != fake["empty"]:
                expected.append((fake["on_disk"][name_].resolve(), label))
        assert _read_tsv(root / f"{name}.txt") == expected
        rep = json.loads((root / f"{name}.txt.report.json").read_text())
        want_missing = sorted(n for n in (f"{y}_{s:06d}_{e:06d}" for _, y, s, e in fake["rows"][split])
                              if n in fake["missing"])
        assert sorted(rep["missing_items"]) == want_missing and rep["missing"] == len(want_missing)
        assert rep["splits"] == {split: {"rows": len(fake["rows"][split]), "listed": len(expected)}}
        assert rep["duplicate_rows"] == (1 if split == "train" else 0)
        assert rep["empty_items"] == ([str(fake["on_disk"][fake["empty"]])] if split == "validate" else [])
    printed = capsys.readouterr().out
    assert "missing" in printed and "duplicate rows" in printed

    ds = scan_dataset(root)
    assert ds.kind == "video" and ds.classes == sorted(CLASSES)
    assert [(s.path.resolve(), ds.classes[s.label]) for s in ds.splits["val"]] == _read_tsv(root / "val.txt")

    _, tok_path, run = _tiny_setup(tmp_path)
    tok = get_tokenizer(tok_path)
    model, cfg, state = load_model(run)
    spec = SequenceSpec("video", frames=2, stride=1)
    layout = check_compatible(cfg.model, state, tok, spec, "ckpt")
    feats, manifest = FeatureExtractor(model, layout, tok, spec, [1], {"m": 1}, torch.device("cpu"),
                                       progress=False).run(ds, tmp_path / "cache")
    assert feats["val"].layer(1).shape == (len(ds.splits["val"]), 8, cfg.model.dim)
    assert manifest["splits"]["train"]["skipped"] == [] and manifest["splits"]["val"]["skipped"] == []


def test_kinetics_max_per_class_and_reader_compat(tmp_path):
    fake = _kinetics(tmp_path)
    root = fake["root"]
    out = tmp_path / "lists" / "train.txt"
    assert main(["lists", "kinetics", "--csv", str(root / "train.csv"), "--videos", str(root),
                 "--videos", str(tmp_path / "more"), "--max-per-class", "2", "--out", str(out), "--no-progress"]) == 0
    want, seen = [], {}
    for label, y, s, e in fake["rows"]["train"]:  # the first two clips on disk of each class, CSV order
        name = f"{y}_{s:06d}_{e:06d}"
        if name in fake["on_disk"] and seen.get(label, 0) < 2:
            seen[label] = seen.get(label, 0) + 1
            want.append((fake["on_disk"][name].resolve(), label))
    assert _read_tsv(out) == want and len(want) == 4
    rep = json.loads((tmp_path / "lists" / "train.txt.report.json").read_text())
    assert rep["dropped_max_per_class"] == 6 - 4 and rep["missing"] == 2

    # the reader: old space-separated lines are unchanged, tab lines keep spaces in paths and labels
    from toto.data.lists import read_list

    d = tmp_path / "compat"
    d.mkdir()
    (d / "l.txt").write_text("a b/c.mp4 cls\n/abs/x.mp4\tair drumming\n  dir with space/y.mp4 \t two words \n")
    assert read_list(d / "l.txt") == [(d / "a b/c.mp4", "cls"), (Path("/abs/x.mp4"), "air drumming"),
                                       (d / "dir with space/y.mp4", "two words")]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("toto lists: error: ")
    return err


def test_errors_are_one_line(tmp_path, capsys):
    fake = _imagenet(tmp_path)
    root, val = fake["root"], str(fake["root"] / "val")
    out = str(tmp_path / "o" / "val.txt")
    imnet = ["lists", "imagenet", "--val-dir", val, "--out", out, "--no-progress"]
    assert "nope.csv: annotation file not found" in _error(capsys, imnet + ["--solution", str(tmp_path / "nope.csv")])
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,Label\nx,n01440764\n")
    assert "bad.csv:1: expected the header" in _error(capsys, imnet + ["--solution", str(bad)])
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\nILSVRC2012_val_00000002,\n")
    assert "bad.csv:3:" in _error(capsys, imnet + ["--solution", str(bad)])
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000001,n01443537\n")
    assert "bad.csv:3: ImageId ILSVRC2012_val_00000001 also on line 2" in _error(capsys, imnet + ["--solution", str(bad)])
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n09999999\n")
    err = _error(capsys, imnet + ["--solution", str(bad), "--train-dir", str(root / "train")])
    assert "no class folder in" in err and "n09999999" in err
    bad.write_text("ImageId,PredictionString\nILSVRC2012_val_00000099,n01440764\n")
    assert "none of the 1 images" in _error(capsys, imnet + ["--solution", str(bad)])
    gt = tmp_path / "gt.txt"
    gt.write_text("1\n1001\n")
    _write_meta(tmp_path / "meta.mat", WNIDS)
    assert "gt.txt:2: expected a class id" in _error(capsys, imnet + ["--ground-truth", str(gt), "--meta",
                                                                      str(tmp_path / "meta.mat")])
    for junk in (b"short", b"not matlab" * 30):
        (tmp_path / "junk.mat").write_bytes(junk)
        assert "junk.mat: not a readable MATLAB file" in _error(
            capsys, imnet + ["--ground-truth", str(gt), "--meta", str(tmp_path / "junk.mat")])
    import scipy.io

    scipy.io.savemat(tmp_path / "other.mat", {"classes": np.arange(3)})
    assert "other.mat: expected a struct array 'synsets'" in _error(
        capsys, imnet + ["--ground-truth", str(gt), "--meta", str(tmp_path / "other.mat")])
    assert "--ground-truth needs --meta" in _error(capsys, imnet + ["--ground-truth", str(gt)])

    kin = ["lists", "kinetics", "--videos", val, "--out", out, "--no-progress"]
    assert "k.csv: annotation file not found" in _error(capsys, kin + ["--csv", str(tmp_path / "k.csv")])
    k = tmp_path / "k.csv"
    k.write_text("youtube_id,time_start,time_end\nabc,1,2\n")
    assert "k.csv:1: header lacks ['label']" in _error(capsys, kin + ["--csv", str(k)])
    k.write_text("label,youtube_id,time_start,time_end,split\nx,abc,1,11,val\ny,abd,one,11,val\n")
    assert "k.csv:3: expected 5 fields" in _error(capsys, kin + ["--csv", str(k)])
    k.write_text("label,youtube_id,time_start,time_end,split\nx,abc,1,11,val\n")
    err = _error(capsys, kin + ["--csv", str(k)])
    assert "no clip of" in err and "abc_000001_000011.mp4" in err
    assert main(kin + ["--csv", str(k), "--max-per-class", "0"]) == 2  # refused by the parser, one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --max-per-class: must be > 0, got 0" in err
    assert "media folder not found" in _error(capsys, ["lists", "kinetics", "--csv", str(k), "--videos",
                                                       str(tmp_path / "none"), "--out", out])
    assert not (tmp_path / "o").exists()  # nothing written on error
