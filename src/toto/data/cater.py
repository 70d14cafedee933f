"""The CATER release (Girdhar & Ramanan, ICLR 2020) -> the list files `toto probe`/`toto finetune` read.

A CATER variant (``max2action``, ``all_actions``, and their ``*_cameramotion`` versions; or a
folder ``toto synth cater`` wrote) unpacks to::

    videos/CATER_new_005748.avi ...          (``images/`` in CATER's own generator)
    scenes/CATER_new_005748.json ...         (optional: objects, per-frame locations, movements)
    lists/localize/{train,val}.txt           lines ``CATER_new_005748.avi 33``

Task 3 of CATER (snitch localisation) labels a video with the cell of a 6x6 grid over the floor
holding the snitch at the last frame (36 classes). The snitch is "hidden" at the end when a cone
covers it; the "last place seen" oracle predicts the cell where it was last uncovered. Both come
from the scene files (per-video fields of generated sets; for the real release they are derived
from the movements: a ``_contain`` covers from its last frame, a ``_pick_place`` of the covering
cone uncovers from its first frame).

Videos named by the lists but missing, unreadable, shorter than the sampled window, or with a
label outside 0..35 are counted, named in the report, and left out, and so are val videos whose
cell no kept train video has (none in a real split; a small generated set can have some); a
malformed line is an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..ioutil import atomic_write_json
from .lists import ListResult, write_list

CLASSES = 36
GRID = 6
SPLITS = ("train", "val")


def window_frames(frames: int, stride: int) -> int:
    """Source frames a window of ``frames`` kept frames spans at ``stride``."""
    return (frames - 1) * stride + 1


def default_stride(video_frames: int, frames: int) -> int:
    """The largest stride whose window fits the video: 301-frame CATER videos give 20 for 16
    frames and 9 for 32 (the window ends at the last frame, where the label is)."""
    return max(1, (video_frames - 1) // (frames - 1))


def stride_for(root: Path, task: str, frames: int) -> int:
    """``default_stride`` for the first readable video of the train list."""
    from .video import frame_count_hint

    videos = find_videos_dir(Path(root))
    for name, _, _ in read_cater_list(Path(root) / "lists" / task / "train.txt"):
        n = frame_count_hint(videos / name)
        if n:
            return default_stride(n, frames)
    raise DataError(f"{root}: no video of lists/{task}/train.txt gives its frame count; pass --stride")


def read_cater_list(path: Path) -> list[tuple[str, str, int]]:
    """``name label`` lines -> ``[(name, label text, line number)]``; DataError on a malformed line."""
    if not path.is_file():
        raise DataError(f"{path}: list file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'CATER_new_005748.avi 33', got {line!r}")
        rows.append((parts[0], parts[1], n))
    return rows


def cell_of(x: float, y: float) -> int:
    """CATER's localize class of a floor point (``gen_train_test.localize_dataset``)."""
    col = min(max(int(math.floor(x)) + GRID // 2, 0), GRID - 1)
    row = min(max(int(math.floor(y)) + GRID // 2, 0), GRID - 1)
    return row * GRID + col


def grid_l1(a: int, b: int) -> int:
    """Manhattan distance in cells between two classes."""
    return abs(a // GRID - b // GRID) + abs(a % GRID - b % GRID)


def scene_summary(scene: dict) -> dict:
    """``{"hidden": bool, "last_seen_cell": int, "container": str | None}`` of one scene file."""
    objects = scene["objects"]
    snitch = next(o for o in objects if o["shape"] == "spl")
    if "snitch_covered" in scene:  # written by toto synth cater: covering per rendered frame
        covered = scene["snitch_covered"]
        k = max([i for i, c in enumerate(covered) if not c] or [0])
        seen = snitch["locations"][str(scene["frame_ids"][k])]
        return {"hidden": bool(covered[-1]), "last_seen_cell": cell_of(*seen[:2]),
                "container": scene.get("container_last")}
    events = []  # (frame, order, kind, actor, covered top)
    for actor, moves in scene.get("movements", {}).items():
        for m in moves:
            action, other, start, end = m[0], m[1], int(m[2]), int(m[3])
            if action == "_contain":
                events.append((end, 1, "cover", actor, other))
            elif action == "_pick_place":
                events.append((start, 0, "lift", actor, None))
    parent: dict[str, str] = {}
    covered_since, container = None, None
    for frame, _, kind, actor, other in sorted(events, key=lambda e: (e[0], e[1])):
        was = _outermost(parent, snitch["instance"])
        if kind == "cover":
            parent[other] = actor
        else:
            parent = {k: v for k, v in parent.items() if v != actor}
        now = _outermost(parent, snitch["instance"])
        if was is None and now is not None:
            covered_since = frame
        container = now
    locs = snitch["locations"]
    last = str(len(locs) - 1)
    seen = str(covered_since) if container is not None and str(covered_since) in locs else last
    return {"hidden": container is not None, "last_seen_cell": cell_of(*locs[seen][:2]), "container": container}


def _outermost(parent: dict[str, str], node: str) -> str | None:
    out = None
    while node in parent:
        node = out = parent[node]
    return out


def find_videos_dir(root: Path) -> Path:
    for name in ("videos", "images"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: no videos/ (or images/) folder")


def check_video(path: Path, need: int) -> str | None:
    """None when ``path`` opens and holds at least ``need`` frames, else why not."""
    from .video import count_frames, frame_count_hint

    if not path.is_file():
        return "missing"
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                return "unreadable"
    except (av.FFmpegError, OSError, ValueError):
        return "unreadable"
    n = frame_count_hint(path)
    if n is None:
        try:
            n = count_frames(path)
        except DataError:
            return "unreadable"
    return "short" if n < need else None


def cater_lists(root: str | Path, out: str | Path, frames: int, stride: int, task: str = "localize",
                progress: bool = True) -> dict:
    """Write ``out/{train,val}.txt`` (``path<TAB>cell``), ``out/cater.json`` (per-video hidden /
    last-seen cell when scene files exist) and ``out/{split}.txt.report.json``; returns the summary."""
    root, out = Path(root).expanduser().absolute(), Path(out)
    if frames < 2 or stride < 1:
        raise ConfigError(f"need --frames >= 2 and --stride >= 1, got {frames}, {stride}")
    videos = find_videos_dir(root)
    need = window_frames(frames, stride)
    scenes = root / "scenes"
    summary = {"root": str(root), "task": task, "frames": frames, "stride": stride,
               "window_source_frames": need, "splits": {}}
    per_video, train_labels = {}, set()
    for split in SPLITS:
        list_file = root / "lists" / task / f"{split}.txt"
        rows = read_cater_list(list_file)
        entries = []
        skipped = {"missing": [], "unreadable": [], "short": [], "bad_label": [], "label_not_in_train": []}
        for name, label, n in tqdm(rows, desc=f"checking {split} videos", disable=not progress, unit=" videos"):
            if not label.isdigit() or not 0 <= int(label) < CLASSES:
                skipped["bad_label"].append(f"{list_file}:{n}: {name} label {label!r} (expected 0..{CLASSES - 1})")
                continue
            if split == "val" and int(label) not in train_labels:  # a probe cannot learn a cell never seen
                skipped["label_not_in_train"].append(f"{list_file}:{n}: {name} label {label}")
                continue
            path = videos / name
            why = check_video(path, need)
            if why:
                skipped[why].append(str(path))
                continue
            entries.append((path, str(int(label))))
            if split == "train":
                train_labels.add(int(label))
            scene = scenes / (Path(name).stem + ".json")
            info = {"split": split, "label": int(label)}
            if scene.is_file():
                try:
                    info.update(scene_summary(json.loads(scene.read_text())))
                except (ValueError, KeyError, TypeError, StopIteration, IndexError) as e:
                    raise DataError(f"{scene}: not a CATER scene file ({type(e).__name__}: {e})") from None
            per_video[str(path)] = info
        if not entries:
            raise DataError(f"{list_file}: no usable video ({', '.join(f'{len(v)} {k}' for k, v in skipped.items())})")
        report = {"source": str(list_file), "rows": len(rows), "kept": len(entries),
                  **{k: {"count": len(v), "items": v} for k, v in skipped.items()}}
        write_list(ListResult(entries, report), out / f"{split}.txt")
        summary["splits"][split] = {"rows": len(rows), "kept": len(entries),
                                    **{k: len(v) for k, v in skipped.items()}}
    summary["videos"] = per_video
    atomic_write_json(out / "cater.json", summary)
    return summary
