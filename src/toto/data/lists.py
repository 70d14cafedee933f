"""Labelled data sets: official ImageNet-1k and Kinetics distributions -> the list files
`toto probe` reads (``write_list``), and reading them back (``scan_dataset``: a data set's
train/val splits as list files or class folders), both here so the format has one home.

A list file holds one ``path<TAB>label`` line per sample (``read_list``: a line with a tab is
split at its last tab, so Kinetics labels keep their spaces; paths are relative to the list
file's folder when the media lies under it, absolute otherwise).

- ImageNet val is a flat folder ``ILSVRC2012_val_%08d.JPEG`` labelled by Kaggle's
  ``LOC_val_solution.csv`` or by the devkit (``ILSVRC2012_validation_ground_truth.txt`` +
  ``meta.mat``); labels are WNIDs, the names of the train class folders.
- Kinetics clips are ``{youtube_id}_{time_start:06d}_{time_end:06d}.{mp4,mkv,webm}`` anywhere under
  the given folders, labelled by the release's CSV (``label,youtube_id,time_start,time_end,...``).

Media missing from a download is counted, listed in the report and left out, never an error
(deleted YouTube videos make every Kinetics copy incomplete); malformed annotations are errors.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..ioutil import atomic_write_bytes, atomic_write_json, read_lines
from .media import IMAGE_EXTS, media_kind

KINETICS_EXTS = frozenset({".mp4", ".mkv", ".webm"})
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
LOC_HEADER = ["ImageId", "PredictionString"]
WNID = re.compile(r"n\d{8}")
CLIP_NAME = re.compile(r"(?P<id>.+)_(?P<start>\d+)_(?P<end>\d+)")  # youtube ids may hold '_' and '-'


@dataclass
class ListResult:
    """Found samples in annotation order, plus everything the report says about the rest."""

    entries: list[tuple[Path, str]]
    report: dict = field(default_factory=dict)


# -- shared: finding files, writing the list ----------------------------------------------------

def index_files(dirs: list[str | Path], exts: frozenset[str], key, progress: bool = True):
    """Walk ``dirs`` once: ``key(file_name_stem) -> hashable | None`` for files with ``exts``.

    Returns ``(index: key -> first path (sorted), duplicates: key -> all paths, n_files)``."""
    dirs = [Path(d).expanduser().absolute() for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise DataError(f"{d}: media folder not found")
    found: dict = {}
    n_files = 0
    bar = tqdm(desc="indexing files", unit=" files", disable=not progress, mininterval=1.0)
    for d in dirs:
        for parent, subdirs, files in os.walk(d, followlinks=True):
            subdirs.sort()
            for name in files:
                stem, ext = os.path.splitext(name)
                if name.startswith(".") or ext.lower() not in exts:
                    continue
                k = key(stem)
                if k is None:
                    continue
                n_files += 1
                found.setdefault(k, []).append(Path(parent) / name)
            bar.update(len(files))
    bar.close()
    index = {k: sorted(v)[0] for k, v in found.items()}
    duplicates = {k: sorted(v) for k, v in found.items() if len(v) > 1}
    return index, duplicates, n_files


def list_text(entries: list[tuple[Path, str]], out: Path) -> str:
    """``path<TAB>label`` lines; a path under ``out``'s folder is written relative to it."""
    base = out.parent.absolute()
    lines = []
    for path, label in entries:
        p = Path(path).absolute()
        try:
            text = str(p.relative_to(base))
        except ValueError:
            text = str(p)
        for what, s in (("path", text), ("label", label)):
            if "\t" in s or "\n" in s or "\r" in s or s != s.strip():
                raise DataError(f"{out}: cannot write {what} {s!r} (tabs, line breaks or outer spaces)")
        lines.append(f"{text}\t{label}\n")
    return "".join(lines)


def write_list(result: ListResult, out: str | Path) -> Path:
    """Write ``out`` and ``<out>.report.json`` atomically; returns the report's path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, list_text(result.entries, out).encode())
    report_path = out.with_name(out.name + ".report.json")
    atomic_write_json(report_path, {"list": _abs(out), **result.report})
    return report_path


# -- reading: list files or class folders -> a labelled data set -----------------------------

SPLITS = ("train", "val")


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class LabelledDataset:
    root: Path
    kind: str  # "image" | "video"
    classes: list[str]
    splits: dict[str, list[Sample]]
    skipped_classes: list[str] = field(default_factory=list)  # class folders without media files

    def fingerprint(self, split: str) -> str:
        """Hash of the split's (path, label, size, mtime): a changed file changes the cache key."""
        h = hashlib.sha256()
        for s in self.splits[split]:
            st = s.path.stat() if s.path.exists() else None
            h.update(f"{s.path}\t{s.label}\t{st and st.st_size}\t{st and st.st_mtime_ns}\n".encode())
        return h.hexdigest()


def _scan_folders(split_dir: Path, skipped: list[str]) -> list[tuple[Path, str]]:
    items = []
    class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<media files>)")
    for d in class_dirs:
        files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".") and media_kind(p))
        if not files:
            skipped.append(str(d))
            continue
        items += [(p, d.name) for p in files]
    return items


def read_list(list_file: Path) -> list[tuple[Path, str]]:
    """The (path, label) lines of a list file, as ``write_list`` writes them."""
    items = []
    for n, line in enumerate(read_lines(list_file), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [s.strip() for s in line.rsplit("\t", 1)] if "\t" in line else line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{list_file}:{n}: expected 'path label', got {line!r}")
        path = Path(parts[0])
        path = path if path.is_absolute() else list_file.parent / path
        if not media_kind(path):
            raise DataError(f"{list_file}:{n}: {path.name} has no known image or video extension")
        items.append((path, parts[1]))
    if not items:
        raise DataError(f"{list_file}: no 'path label' lines")
    return items


def scan_dataset(root: str | Path, max_per_class: int | None = None) -> LabelledDataset:
    """Find the train/val splits under ``root`` (class folders or list files) and label them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    raw, skipped = {}, []
    for split in SPLITS:
        if (root / f"{split}.txt").is_file():  # a list wins over a folder beside it (ImageNet's flat val/)
            raw[split] = read_list(root / f"{split}.txt")
        elif (root / split).is_dir():
            raw[split] = _scan_folders(root / split, skipped)
        else:
            raise DataError(f"{root}: missing the {split} split (expected a folder {root / split}/<class>/ "
                            f"or a list file {root / split}.txt)")
    classes = sorted({label for _, label in raw["train"]})
    if not classes:
        raise DataError(f"{root / 'train'}: no class has any media file")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for _, label in raw["val"]} - set(classes))
    if unknown:
        raise DataError(f"{root}: val classes {unknown[:5]} do not occur in the train split")
    kinds = {media_kind(p) for items in raw.values() for p, _ in items}
    if len(kinds) != 1:
        raise DataError(f"{root}: mixes images and videos; probe one kind of media at a time")
    splits = {}
    for split, items in raw.items():
        per_class: dict[str, int] = {}
        samples = []
        for p, label in items:
            per_class[label] = per_class.get(label, 0) + 1
            if max_per_class is None or per_class[label] <= max_per_class:
                samples.append(Sample(p, index[label]))
        splits[split] = samples
    return LabelledDataset(root, kinds.pop(), classes, splits, skipped)


# -- writing -------------------------------------------------------------------------------------

def _abs(path) -> str:
    return str(Path(path).expanduser().absolute())


def _class_counts(entries) -> dict[str, int]:
    return dict(sorted(Counter(label for _, label in entries).items()))


def _usable(path: Path, empty: list[str]) -> bool:
    """False for a zero-byte file (an aborted download), which is recorded in ``empty``."""
    if path.stat().st_size == 0:
        empty.append(str(path))
        return False
    return True


def _open_csv(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    return open(path, newline="", encoding="utf-8-sig")


# -- ImageNet-1k validation ---------------------------------------------------------------------

def read_loc_solution(path: str | Path) -> list[tuple[str, str, int]]:
    """Kaggle's ``LOC_val_solution.csv`` -> ``[(image_id, wnid, line)]``; the first token of
    PredictionString is the class (the rest are boxes)."""
    path = Path(path)
    rows = []
    with _open_csv(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != LOC_HEADER:
            raise DataError(f"{path}:1: expected the header {','.join(LOC_HEADER)}, got {header!r}")
        for row in reader:
            n = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            tokens = row[1].split() if len(row) == 2 else []
            if len(row) != 2 or not row[0].strip() or not tokens or not WNID.fullmatch(tokens[0]):
                raise DataError(f"{path}:{n}: expected 'ImageId,<wnid> <box> ...' (wnid like n01440764), got {row!r}")
            rows.append((row[0].strip(), tokens[0], n))
    return rows


def read_meta_wnids(path: str | Path) -> dict[int, str]:
    """The devkit's ``meta.mat`` -> ``{ILSVRC2012_ID: WNID}`` of the 1000 leaf classes (ids 1..1000).

    ``synsets`` is a MATLAB struct array; loadmat(squeeze_me=True) gives a record array whose
    fields index by name (shape (n,) for the real (1860, 1) array, 0-d for a single synset)."""
    import numpy as np
    import scipy.io
    from scipy.io.matlab import MatReadError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: meta.mat not found")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (MatReadError, ValueError, NotImplementedError, OSError, TypeError) as e:  # v7.3 (HDF5) is NotImplemented
        raise DataError(f"{path}: not a readable MATLAB file ({e})") from None
    synsets = mat.get("synsets")
    names = getattr(getattr(synsets, "dtype", None), "names", None) or ()
    if "ILSVRC2012_ID" not in names or "WNID" not in names:
        raise DataError(f"{path}: expected a struct array 'synsets' with fields ILSVRC2012_ID and WNID, "
                        f"found variables {sorted(k for k in mat if not k.startswith('__'))}")
    synsets = np.atleast_1d(synsets)
    out: dict[int, str] = {}
    for s in synsets:
        i, wnid = int(s["ILSVRC2012_ID"]), str(s["WNID"]).strip()
        if 1 <= i <= 1000:
            if i in out or not WNID.fullmatch(wnid):
                raise DataError(f"{path}: synset ILSVRC2012_ID {i} is duplicated or has a bad WNID {wnid!r}")
            out[i] = wnid
    if not out:
        raise DataError(f"{path}: no synset with ILSVRC2012_ID in 1..1000")
    return out


def read_devkit(ground_truth: str | Path, meta: str | Path) -> list[tuple[str, str, int]]:
    """``ILSVRC2012_validation_ground_truth.txt`` (line i: the class id of image i) + ``meta.mat``
    -> ``[(image_id, wnid, line)]``."""
    ground_truth = Path(ground_truth)
    if not ground_truth.is_file():
        raise DataError(f"{ground_truth}: ground-truth file not found")
    wnids = read_meta_wnids(meta)
    rows = []
    for n, line in enumerate(read_lines(ground_truth), 1):
        text = line.strip()
        try:
            wnid = wnids[int(text)]
        except (ValueError, KeyError):
            raise DataError(f"{ground_truth}:{n}: expected a class id in {meta}'s ILSVRC2012_IDs "
                            f"(1..1000), got {text!r}") from None
        rows.append((f"ILSVRC2012_val_{n:08d}", wnid, n))
    if not rows:
        raise DataError(f"{ground_truth}: empty")
    return rows


def class_folders(train_dir: str | Path) -> set[str]:
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise DataError(f"{train_dir}: train folder not found")
    names = {p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if not names:
        raise DataError(f"{train_dir}: no class folders")
    return names


def imagenet_val_list(val_dir: str | Path, rows: list[tuple[str, str, int]], source: str | Path,
                      train_dir: str | Path | None = None, progress: bool = True) -> ListResult:
    """Label the images under ``val_dir`` (found by file stem = ImageId, any image extension)."""
    seen: dict[str, int] = {}
    for image_id, _, n in rows:
        if image_id in seen:
            raise DataError(f"{source}:{n}: ImageId {image_id} also on line {seen[image_id]}")
        seen[image_id] = n
    labels = {wnid for _, wnid, _ in rows}
    if train_dir is not None:
        unknown = sorted(labels - class_folders(train_dir))
        if unknown:
            raise DataError(f"{source}: {len(unknown)} label(s) have no class folder in {train_dir}, "
                            f"e.g. {unknown[:5]}")
    index, dup_files, n_files = index_files([val_dir], IMAGE_EXTS, lambda stem: stem, progress)
    entries, missing, empty = [], [], []
    for image_id, wnid, _ in rows:
        if image_id not in index:
            missing.append(image_id)
        elif _usable(index[image_id], empty):
            entries.append((index[image_id], wnid))
    if not entries:
        raise DataError(f"{val_dir}: none of the {len(rows)} images of {source} found "
                        f"({n_files} image files there, {len(empty)} empty; e.g. {sorted(index)[:3]})")
    unlabelled = sorted(set(index) - set(seen))
    return ListResult(entries, {
        "kind": "imagenet", "split": "val", "annotations": _abs(source), "media": [_abs(val_dir)],
        "train_dir": None if train_dir is None else _abs(train_dir),
        "rows": len(rows), "listed": len(entries), "n_classes": len({label for _, label in entries}),
        "missing": len(missing), "empty": len(empty), "duplicate_files": len(dup_files),
        "unlabelled_files": len(unlabelled),
        "splits": {"val": {"rows": len(rows), "listed": len(entries)}},
        "per_class": _class_counts(entries),
        "missing_items": missing, "empty_items": empty,
        "duplicate_file_items": {k: [str(p) for p in v] for k, v in dup_files.items()},
        "unlabelled_items": [str(index[k]) for k in unlabelled],
    })


# -- Kinetics-400/600/700 -----------------------------------------------------------------------

@dataclass(frozen=True)
class KineticsRow:
    label: str
    youtube_id: str
    start: int
    end: int
    split: str
    line: int

    @property
    def key(self) -> tuple[str, int, int]:
        return self.youtube_id, self.start, self.end

    @property
    def name(self) -> str:
        return f"{self.youtube_id}_{self.start:06d}_{self.end:06d}"


def _seconds(text: str) -> int:
    """Clip bounds are whole seconds ('14' or '14.0')."""
    v = float(text)
    if v < 0 or v != int(v):
        raise ValueError(text)
    return int(v)


def read_kinetics_csv(path: str | Path) -> list[KineticsRow]:
    """A Kinetics annotation CSV (``label,youtube_id,time_start,time_end,split[,is_cc]``)."""
    path = Path(path)
    rows = []
    with _open_csv(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        lacking = [c for c in KINETICS_COLUMNS if c not in header]
        if lacking:
            raise DataError(f"{path}:1: header lacks {lacking} (expected {','.join(KINETICS_COLUMNS)},split; "
                            f"got {','.join(header) or 'nothing'})")
        col = {c: header.index(c) for c in header}
        for row in reader:
            n = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            try:
                if len(row) != len(header):
                    raise ValueError
                label, yid = row[col["label"]].strip(), row[col["youtube_id"]].strip()
                if not label or not yid:
                    raise ValueError
                r = KineticsRow(label, yid, _seconds(row[col["time_start"]]), _seconds(row[col["time_end"]]),
                                row[col["split"]].strip() if "split" in col else path.stem, n)
            except ValueError:
                raise DataError(f"{path}:{n}: expected {len(header)} fields {','.join(header)} with a label, "
                                f"a youtube id and whole-second times, got {row!r}") from None
            rows.append(r)
    if not rows:
        raise DataError(f"{path}: no annotation rows")
    return rows


def _clip_key(stem: str):
    m = CLIP_NAME.fullmatch(stem)
    return (m["id"], int(m["start"]), int(m["end"])) if m else None


def kinetics_list(csv_path: str | Path, video_dirs: list[str | Path], max_per_class: int | None = None,
                  progress: bool = True) -> ListResult:
    """Find each annotated clip under ``video_dirs`` by its canonical name (zero padding optional)."""
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"--max-per-class must be >= 1, got {max_per_class}")
    rows = read_kinetics_csv(csv_path)
    index, dup_files, n_files = index_files(video_dirs, KINETICS_EXTS, _clip_key, progress)
    first: dict[tuple, KineticsRow] = {}
    dup_rows, missing, empty, entries, split_of = [], [], [], [], []
    per_class: Counter = Counter()
    dropped = 0
    for r in rows:
        if r.key in first:
            dup_rows.append({"clip": r.name, "lines": [first[r.key].line, r.line],
                             "labels": [first[r.key].label, r.label]})
            continue
        first[r.key] = r
        if r.key not in index:
            missing.append(r.name)
            continue
        if not _usable(index[r.key], empty):
            continue
        if max_per_class is not None and per_class[r.label] >= max_per_class:
            dropped += 1
            continue
        per_class[r.label] += 1
        entries.append((index[r.key], r.label))
        split_of.append(r.split)
    if not entries:
        raise DataError(f"no clip of {csv_path} found under {', '.join(map(str, video_dirs))} "
                        f"({n_files} clip files there, {len(empty)} empty; expected names like "
                        f"{rows[0].name}.mp4)")
    splits = {}
    for r in first.values():
        splits.setdefault(r.split, {"rows": 0, "listed": 0})["rows"] += 1
    for s in split_of:
        splits[s]["listed"] += 1
    unlisted = len(set(index) - set(first))
    return ListResult(entries, {
        "kind": "kinetics", "annotations": _abs(csv_path), "media": [_abs(d) for d in video_dirs],
        "max_per_class": max_per_class,
        "rows": len(rows), "listed": len(entries), "n_classes": len({label for _, label in entries}),
        "n_classes_annotated": len({r.label for r in rows}),
        "missing": len(missing), "empty": len(empty), "duplicate_rows": len(dup_rows),
        "duplicate_files": len(dup_files), "dropped_max_per_class": dropped, "unlisted_files": unlisted,
        "splits": splits, "per_class": _class_counts(entries),
        "missing_items": missing, "empty_items": empty, "duplicate_row_items": dup_rows,
        "duplicate_file_items": {"_".join(map(str, k)): [str(p) for p in v] for k, v in dup_files.items()},
    })
