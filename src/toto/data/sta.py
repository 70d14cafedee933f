"""Ego4D short-term anticipation (STA) data as users have it.

* Annotation files ``fho_sta_{train,val}.json`` / ``fho_sta_test_unannotated.json``: ``annotations``
  records with ``uid``, the video (``video_id`` in the v1 release, ``video_uid`` in v2), ``frame``,
  ``clip_uid``, ``clip_frame`` and (not in test) ``objects`` of ``box`` [x1, y1, x2, y2] in pixels of
  the frame, ``noun_category_id``, ``verb_category_id``, ``time_to_contact`` (s); the taxonomies
  ``noun_categories`` / ``verb_categories`` ([{id, name}]); ``info.video_metadata`` {video: {fps,
  frame_width, frame_height}}.
* Canonical clips ``<clip_uid>.mp4``: the context is ``n_frames`` frames ending at ``clip_frame`` at
  a ``stride`` (indices below 0 clamp to 0, as the Ego4D loader does), decoded in order with PyAV
  and resized to ``resolution x resolution`` (the whole frame, no crop, so every box stays inside).
* The baseline's ``object_detections.json``: {uid: [{box, score, noun_category_id}]} on the
  full-resolution annotated frame.

Errors that make a file unusable (bad JSON, a record without its fields, a noun/verb id outside
the taxonomy) are one DataError naming the file and the record. Boxes outside the frame (beyond one
pixel) or empty are counted and skipped; missing clips and annotated frames past a clip's end are
counted and named in ``Skipped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

SPLIT_FILES = {"train": "fho_sta_train.json", "val": "fho_sta_val.json", "test": "fho_sta_test_unannotated.json"}
BOX_SLACK = 1.0  # pixels a box may exceed the frame by (then clipped); more is an annotation error


@dataclass
class StaObject:
    box: tuple[float, float, float, float]
    noun: int
    verb: int
    ttc: float


@dataclass
class StaRecord:
    uid: str
    video_uid: str
    frame: int
    clip_uid: str
    clip_frame: int
    width: int | None
    height: int | None
    fps: float | None
    objects: list[StaObject] | None  # None in the unannotated test file


@dataclass
class Skipped:
    """What was left out, by reason, with names (uids, clip names, 'uid object j')."""

    items: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.items.setdefault(reason, []).append(name)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.items.items()}

    def summary(self) -> str:
        return ", ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in self.items.items()) or "nothing skipped"


@dataclass
class StaSplit:
    path: Path
    version: str  # "v1" (video_id) or "v2" (video_uid)
    records: list[StaRecord]
    nouns: dict[int, str]
    verbs: dict[int, str]
    skipped: Skipped


def load_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path}: not valid JSON ({e})") from None


def _taxonomy(data: dict, key: str, where: str) -> dict[int, str] | None:
    if key not in data:
        return None
    cats = data[key]
    try:
        return {int(c["id"]): str(c["name"]) for c in cats}
    except (TypeError, KeyError, ValueError):
        raise DataError(f"{where}: '{key}' must be a list of {{id, name}}") from None


def check_box(box, width: float | None, height: float | None, rec: str):
    """A usable box clipped to the frame, or None (empty, or outside by more than BOX_SLACK px)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in box):
        raise DataError(f"{rec}: invalid box {box!r} (4 numbers x1, y1, x2, y2)")
    x1, y1, x2, y2 = (float(x) for x in box)
    if width is not None and height is not None:
        if min(x1, y1) < -BOX_SLACK or x2 > width + BOX_SLACK or y2 > height + BOX_SLACK:
            return None
        x1, x2 = np.clip([x1, x2], 0, width)
        y1, y2 = np.clip([y1, y2], 0, height)
    if x2 <= x1 or y2 <= y1:
        return None
    return float(x1), float(y1), float(x2), float(y2)


def _int(a: dict, key: str, rec: str) -> int:
    v = a.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DataError(f"{rec}: missing or non-integer '{key}' ({v!r})")
    return v


def read_annotations(path: str | Path, taxonomy: tuple[dict, dict] | None = None) -> StaSplit:
    """Parse one STA annotation file; ``taxonomy`` (nouns, verbs) for a file without its own."""
    path = Path(path)
    data = load_json(path, "annotations")
    where = str(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{where}: expected a JSON object with an 'annotations' list")
    nouns, verbs = _taxonomy(data, "noun_categories", where), _taxonomy(data, "verb_categories", where)
    if taxonomy is not None:
        nouns, verbs = nouns or taxonomy[0], verbs or taxonomy[1]
    meta = (data.get("info") or {}).get("video_metadata") or {}
    skipped = Skipped()
    records, version = [], None
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("uid"), str):
            raise DataError(f"{where}: annotation {k}: missing 'uid'")
        rec = f"{where}: uid {a['uid']}"
        vkey = "video_uid" if "video_uid" in a else "video_id" if "video_id" in a else None
        if vkey is None:
            raise DataError(f"{rec}: missing 'video_uid' (v2) / 'video_id' (v1)")
        version = version or ("v2" if vkey == "video_uid" else "v1")
        if not isinstance(a.get("clip_uid"), str):
            raise DataError(f"{rec}: missing 'clip_uid'")
        video = a[vkey]
        vm = meta.get(video, {})
        width, height, fps = vm.get("frame_width"), vm.get("frame_height"), vm.get("fps")
        objects = None
        if "objects" in a:
            objects = []
            for j, o in enumerate(a["objects"] if isinstance(a["objects"], list) else [None]):
                orec = f"{rec}, object {j}"
                if not isinstance(o, dict):
                    raise DataError(f"{orec}: not an object")
                noun, verb = _int(o, "noun_category_id", orec), _int(o, "verb_category_id", orec)
                if nouns is not None and noun not in nouns:
                    raise DataError(f"{orec}: unknown noun_category_id {noun} (not in the noun taxonomy)")
                if verbs is not None and verb not in verbs:
                    raise DataError(f"{orec}: unknown verb_category_id {verb} (not in the verb taxonomy)")
                ttc = o.get("time_to_contact")
                if not isinstance(ttc, (int, float)) or isinstance(ttc, bool) or not np.isfinite(ttc) or ttc < 0:
                    raise DataError(f"{orec}: invalid time_to_contact {ttc!r}")
                box = check_box(o.get("box"), width, height, orec)
                if box is None:
                    skipped.add("boxes outside the frame or empty", f"{a['uid']} object {j}")
                    continue
                objects.append(StaObject(box, noun, verb, float(ttc)))
            if not objects:
                skipped.add("annotations without a usable object", a["uid"])
                continue
        records.append(StaRecord(a["uid"], video, _int(a, "frame", rec), a["clip_uid"],
                                 _int(a, "clip_frame", rec), width, height, fps, objects))
    return StaSplit(path, version or "v2", records, nouns or {}, verbs or {}, skipped)


@dataclass
class Detection:
    box: tuple[float, float, float, float]
    score: float
    noun: int


def read_detections(path: str | Path, nouns: dict[int, str] | None = None,
                    frame_sizes: dict[str, tuple[int, int]] | None = None,
                    skipped: Skipped | None = None) -> dict[str, list[Detection]]:
    """``object_detections.json``: {uid: [Detection]}; boxes clipped to the frame when its size is
    known (``frame_sizes`` {uid: (w, h)}), empty or far-outside ones counted in ``skipped``."""
    path = Path(path)
    data = load_json(path, "detections")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{uid: [detections]}}")
    frame_sizes = frame_sizes or {}
    out = {}
    for uid, dets in data.items():
        rec = f"{path}: uid {uid}"
        if not isinstance(dets, list):
            raise DataError(f"{rec}: detections must be a list")
        w, h = frame_sizes.get(uid, (None, None))
        keep = []
        for j, d in enumerate(dets):
            drec = f"{rec}, detection {j}"
            if not isinstance(d, dict):
                raise DataError(f"{drec}: not an object")
            noun = _int(d, "noun_category_id", drec)
            if nouns and noun not in nouns:
                raise DataError(f"{drec}: unknown noun_category_id {noun} (not in the noun taxonomy)")
            score = d.get("score")
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not np.isfinite(score):
                raise DataError(f"{drec}: invalid score {score!r}")
            box = check_box(d.get("box"), w, h, drec)
            if box is None:
                if skipped is not None:
                    skipped.add("detections outside the frame or empty", f"{uid} detection {j}")
                continue
            keep.append(Detection(box, float(score), noun))
        out[uid] = keep
    return out


def context_indices(clip_frame: int, n_frames: int, stride: int) -> list[int]:
    """The ``n_frames`` frame indices ending at ``clip_frame`` every ``stride`` frames, clamped at 0."""
    return [max(0, clip_frame - (n_frames - 1 - i) * stride) for i in range(n_frames)]


class PastEnd(DataError):
    """The annotated frame lies beyond the clip's last decodable frame."""


def read_context(path: str | Path, indices: list[int], resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Frames ``(T, R, R, 3) uint8`` at ``indices`` (ascending) of a clip, and the clip's (W, H)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    size = None
    n = 0
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise DataError(f"{path}: no video stream")
            for frame in c.decode(video=0):
                if n in wanted:
                    size = (frame.width, frame.height)
                    got[n] = frame.reformat(width=resolution, height=resolution, format="rgb24",
                                            interpolation="AREA").to_ndarray()
                n += 1
                if n > wanted[-1]:
                    break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode ({type(e).__name__}: {e})") from None
    if n == 0:
        raise DataError(f"{path}: no decodable video frames")
    if wanted[-1] not in got:
        raise PastEnd(f"{path}: frame {wanted[-1]} is past the end ({n} frames)")
    return np.stack([got[i] for i in indices]), size


@dataclass
class StaExample:
    record: StaRecord
    frames: np.ndarray  # (T, R, R, 3) uint8
    size: tuple[int, int]  # (W, H) of the annotated frame, in the units of the boxes
    detections: list[Detection]


def load_examples(split: StaSplit, clips_dir: str | Path, detections: dict[str, list[Detection]] | None,
                  n_frames: int, stride: int, resolution: int, progress: bool = False) -> list[StaExample]:
    """Decode every record's context; missing/corrupt clips and frames past the end go to
    ``split.skipped`` (by clip name) and lose only their records."""
    from tqdm import tqdm

    clips_dir = Path(clips_dir)
    out = []
    for r in tqdm(split.records, desc="clips", disable=not progress):
        path = clips_dir / f"{r.clip_uid}.mp4"
        if not path.is_file():
            split.skipped.add("missing clips", path.name)
            continue
        try:
            frames, size = read_context(path, context_indices(r.clip_frame, n_frames, stride), resolution)
        except PastEnd:
            split.skipped.add("frames past the clip end", f"{path.name} frame {r.clip_frame} ({r.uid})")
            continue
        except DataError:
            split.skipped.add("corrupt clips", path.name)
            continue
        if r.width is not None and r.height is not None:
            size = (r.width, r.height)
        dets = []
        if detections is not None:
            if r.uid not in detections:
                split.skipped.add("records without detections", r.uid)
                continue
            dets = detections[r.uid]
        out.append(StaExample(r, frames, size, dets))
    return out
