"""A generated STA release: the Ego4D file layout with clips whose answers are known exactly.

Each clip shows three objects (the noun is the shape/colour: disc, bar, square, cross) on a
textured background and a "hand" (a skin-coloured disc) that travels to one of them, the next
active object. The verb is the hand's motion: ``take`` a straight approach, ``stir`` a sideways
wiggle, ``push`` stop-and-go. The hand reaches the object at frame ``c``; the annotated frame
``f`` is earlier, so the time to contact is exactly ``(c - f) / fps``. Written like the release:
``annotations/fho_sta_{train,val}.json``, ``fho_sta_test_unannotated.json`` (v1 or v2 keys),
``clips/<clip_uid>.mp4`` and ``object_detections.json`` with noisy boxes, nouns and scores for
every object (the active one scores higher on average, as a next-active-object detector's would).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..ioutil import atomic_write_json

NOUNS = ["disc", "bar", "square", "cross"]
VERBS = ["take", "stir", "push"]
COLORS = np.array([[220, 60, 50], [60, 190, 80], [60, 90, 220], [230, 210, 50]], dtype=np.float32)
HAND = np.array([240, 190, 160], dtype=np.float32)
HALF = 9  # object half size (px)
HAND_R = 7


def _shape_mask(noun: int, cx: float, cy: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if noun == 0:
        return dx * dx + dy * dy <= HALF * HALF
    if noun == 1:
        return (np.abs(dx) <= HALF) & (np.abs(dy) <= HALF / 3)
    if noun == 2:
        return (np.abs(dx) <= HALF) & (np.abs(dy) <= HALF)
    return ((np.abs(dx) <= HALF) & (np.abs(dy) <= 3)) | ((np.abs(dy) <= HALF) & (np.abs(dx) <= 3))


def _object_box(noun: int, cx: float, cy: float) -> list[float]:
    hy = HALF / 3 if noun == 1 else HALF
    return [cx - HALF, cy - hy, cx + HALF, cy + hy]


def hand_path(verb: int, target: np.ndarray, direction: np.ndarray, speed: float, contact: int,
              t: np.ndarray) -> np.ndarray:
    """Hand centre at frames ``t``: reaches ``target`` at frame ``contact`` (and stays there)."""
    remaining = np.maximum(contact - t, 0).astype(np.float64)
    if verb == 2:  # stop-and-go: moves at 2x speed for 6 frames, rests 6 frames (same mean speed)
        phase = np.mod(remaining, 12)
        dist = (remaining // 12) * 12 * speed + np.minimum(phase, 6) * 2 * speed
    else:
        dist = remaining * speed
    pos = target[None, :] - direction[None, :] * dist[:, None]
    if verb == 1:  # sideways wiggle, zero at contact
        perp = np.array([-direction[1], direction[0]])
        pos = pos + perp[None, :] * (10.0 * np.sin(2 * np.pi * remaining / 12))[:, None]
    return pos


def render_clip(rng: np.random.Generator, width: int, height: int, fps: float, n_frames_before: int,
                ttc_frames: int):
    """One clip: frames (N, H, W, 3) uint8, annotated frame index, and its objects/target."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = 90 + 25 * np.sin(xx[..., None] / 7.0 + rng.uniform(0, 6)) * np.cos(yy[..., None] / 9.0)
    bg = np.repeat(bg, 3, axis=2) + rng.normal(0, 4, (1, 1, 3))
    nouns = rng.choice(len(NOUNS), size=3, replace=False)
    centres = []
    for _ in range(10_000):  # rejection sampling: objects apart, in the upper part of the frame
        c = np.array([rng.uniform(HALF + 2, width - HALF - 2), rng.uniform(HALF + 2, height * 0.65)])
        if all(np.linalg.norm(c - d) > 2.4 * HALF for d in centres):
            centres.append(c)
            if len(centres) == 3:
                break
    else:
        raise ValueError(f"cannot place three objects in a {width}x{height} frame")
    active = int(rng.integers(3))
    verb = int(rng.integers(len(VERBS)))
    speed = float(rng.uniform(1.2, 2.2))
    start = np.array([rng.uniform(0.2, 0.8) * width, height + HAND_R])  # enters from the bottom
    direction = centres[active] - start
    direction = direction / np.linalg.norm(direction)
    f = n_frames_before
    contact = f + ttc_frames
    n = contact + 4
    t = np.arange(n)
    hand = hand_path(verb, centres[active], direction, speed, contact, t)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    base = bg.copy()
    for noun, c in zip(nouns, centres):
        base[_shape_mask(int(noun), c[0], c[1], yy, xx)] = COLORS[noun]
    for i in range(n):
        img = base.copy()
        hx, hy = hand[i]
        img[(xx - hx) ** 2 + (yy - hy) ** 2 <= HAND_R * HAND_R] = HAND
        frames[i] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    objects = [{"noun": int(nouns[k]), "box": _object_box(int(nouns[k]), *centres[k])} for k in range(3)]
    return frames, f, objects, active, verb, ttc_frames / fps


def _noisy_detections(rng: np.random.Generator, objects: list[dict], active: int, width: int, height: int,
                      noun_error: float) -> list[dict]:
    dets = []
    for k, o in enumerate(objects):
        x1, y1, x2, y2 = o["box"]
        w, h = x2 - x1, y2 - y1
        jit = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
        box = [float(np.clip(v, 0, lim)) for v, lim in zip(np.array(o["box"]) + jit, (width, height) * 2)]
        noun = o["noun"] if rng.random() > noun_error else int(rng.integers(len(NOUNS)))
        score = float(rng.uniform(0.45, 1.0) if k == active else rng.uniform(0.05, 0.75))
        dets.append({"box": box, "score": score, "noun_category_id": int(noun)})
    # one spurious box
    cx, cy = rng.uniform(10, width - 10), rng.uniform(10, height - 10)
    dets.append({"box": [cx - 8, cy - 8, cx + 8, cy + 8], "score": float(rng.uniform(0.0, 0.4)),
                 "noun_category_id": int(rng.integers(len(NOUNS)))})
    return dets


def make_sta_release(out: str | Path, n_train: int = 64, n_val: int = 32, n_test: int = 8, width: int = 96,
                     height: int = 64, fps: float = 30.0, context: int = 24, max_ttc_frames: int = 30,
                     version: str = "v2", noun_error: float = 0.1, seed: int = 0, progress: bool = False) -> Path:
    """Write the release under ``out``; returns ``out``. Each clip holds one annotated frame."""
    from tqdm import tqdm

    from ..data.video import write_video

    if version not in ("v1", "v2"):
        raise ValueError(f"version must be v1 or v2, got {version}")
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    taxonomy = {"noun_categories": [{"id": i, "name": n} for i, n in enumerate(NOUNS)],
                "verb_categories": [{"id": i, "name": n} for i, n in enumerate(VERBS)]}
    vkey = "video_uid" if version == "v2" else "video_id"
    detections = {}
    total = n_train + n_val + n_test
    bar = tqdm(total=total, desc="clips", disable=not progress)
    k = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        anns, meta = [], {}
        for _ in range(count):
            clip_uid, video_uid, uid = f"clip{k:05d}", f"video{k:05d}", f"sta{k:05d}"
            ttc_frames = int(rng.integers(3, max_ttc_frames + 1))
            frames, f, objects, active, verb, ttc = render_clip(rng, width, height, fps, context, ttc_frames)
            path = out / "clips" / f"{clip_uid}.mp4"
            if not path.exists():
                write_video(frames, path, fps=fps, crf=12)
            meta[video_uid] = {"fps": fps, "frame_width": width, "frame_height": height}
            ann = {"uid": uid, vkey: video_uid, "frame": f + 1000, "clip_id": k, "clip_uid": clip_uid,
                   "clip_frame": f}
            if split != "test":
                ann["objects"] = [{"box": [round(v, 2) for v in objects[active]["box"]],
                                   "noun_category_id": objects[active]["noun"], "verb_category_id": verb,
                                   "time_to_contact": round(ttc, 6)}]
            anns.append(ann)
            detections[uid] = _noisy_detections(rng, objects, active, width, height, noun_error)
            k += 1
            bar.update()
        doc = {"info": {"version": version, "split": split, "video_metadata": meta}, **taxonomy,
               "annotations": anns}
        name = {"train": "fho_sta_train.json", "val": "fho_sta_val.json", "test": "fho_sta_test_unannotated.json"}
        atomic_write_json(out / "annotations" / name[split], doc)
    bar.close()
    atomic_write_json(out / "object_detections.json", detections)
    return out

