"""Media -> token shards: decode (parallel processes) -> tokenize (batched) -> ShardWriter.

Inputs are ordered videos first, then images (each sorted, see ``find_media``). They are cut
into *units*, the smallest pieces that produce whole sequences:
  * a video: its consecutive windows of ``frames`` kept frames (``video.clip_windows``);
  * a group of ``frames`` consecutive readable images (unreadable ones inside the group are
    skipped). Groups restart at every *image block* of ``frames * IMAGE_BLOCK_GROUPS`` images,
    so where the groups fall never depends on files before the block (which is what lets a run
    be split across processes, below). Images left over at the end of a block (only when some
    in it were unreadable) or of the input are not written (counted as ``leftover_images``)
    because a sequence must have exactly ``frames`` images.

A unit's sequences are added to the writer only when the whole unit decoded without error, so
a file that fails half-way adds nothing. Resuming: before every ``ShardWriter.add`` the
writer's ``meta`` records ``cursor = {next: first input of the unit, written: how many of its
sequences are in shards after this add}`` and the statistics of all finished units; the writer
saves ``meta`` atomically with each shard. A killed run restarts at ``cursor.next``, decodes that
unit again and drops its first ``written`` sequences, so nothing is duplicated or lost.

Parallelism: ``workers`` processes each decode every ``workers``-th input and stream windows into
their own bounded queue; the main process reads the queues in input order (so the output is
identical for any number of workers) and encodes ``batch_frames`` frames per tokenizer call.

Across processes and machines (``part=(i, n)``: ``toto tokenize --part i/n``, or one torchrun
rank each): ``part_ranges`` cuts the input list into ``n`` contiguous ranges at unit starts (a
video, an image block); part ``i`` is an ordinary build of its range into
``DIR/parts/part-i-of-n`` (same writer, lock, resume). The process that completes the last part
merges: it concatenates the parts in order into ``DIR`` and sums their statistics, which gives
exactly the files a one-process run writes (a frame's codes do not depend on its batch, see
``DVAETokenizer``), then deletes ``DIR/parts``. No process group, no scheduler: ranks share
only the file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import shutil
import time
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..ioutil import FolderLockedError, atomic_write_json, dir_lock
from ..tokenizers.base import Tokenizer
from ..vocab import VocabLayout
from .images import read_image
from .media import find_media
from .shards import INDEX, ShardDataset, ShardGeometry, ShardWriter, read_index
from .video import SHORT_POLICIES, clip_windows, iter_video

log = logging.getLogger("toto.data")
SUMMARY = "summary.json"
MAX_SKIP_RECORDS = 1000  # the summary lists at most this many skipped files (counts are exact)
IMAGE_BLOCK_GROUPS = 64  # image groups restart every 64 * frames images (see the module docstring)
PARTS = "parts"


@dataclass
class BuildOptions:
    frames: int = 16  # frames (video) or images per sequence
    stride: int = 4  # keep one video frame in `stride`
    short: str = "pad"  # videos shorter than one sequence: "pad" (repeat last frame) or "skip"
    workers: int = 1  # decoding processes; 0 decodes in the main process
    shard_size: int = 1024  # sequences per shard file
    batch_frames: int = 64  # frames per tokenizer call
    queue_size: int = 8  # messages buffered per worker (bounds memory)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        for name in ("frames", "stride", "shard_size", "batch_frames", "queue_size"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise DataError(f"workers must be >= 0, got {self.workers}")
        if self.short not in SHORT_POLICIES:
            raise DataError(f"short-video policy must be one of {SHORT_POLICIES}, got {self.short!r}")


def new_stats() -> dict:
    return {"videos": 0, "videos_skipped": 0, "images": 0, "images_skipped": 0,
            "video_frames_decoded": 0, "video_frames_kept": 0, "padded_frames": 0,
            "dropped_tail_frames": 0, "leftover_images": 0, "frames_tokenized": 0,
            "sequences_video": 0, "sequences_image": 0, "sequences": 0, "tokens": 0,
            "skip_reasons": {}, "skipped": []}


def merge_stats(total: dict, part: dict) -> None:
    for k, v in part.items():
        if k == "skip_reasons":
            for r, n in v.items():
                total[k][r] = total[k].get(r, 0) + n
        elif k == "skipped":
            total[k].extend(v[: max(0, MAX_SKIP_RECORDS - len(total[k]))])
        else:
            total[k] += v


def _reason_key(msg: str) -> str:
    """'<path>: decoding failed after 12 frames (X)' -> 'decoding failed after N frames'."""
    text = msg.split(": ", 1)[-1].split(" (", 1)[0]
    return re.sub(r"\d+", "N", text)


def _skip(stats: dict, kind: str, path: Path, reason: str) -> None:
    stats[f"{kind}s_skipped"] += 1
    key = _reason_key(reason)
    stats["skip_reasons"][key] = stats["skip_reasons"].get(key, 0) + 1
    stats["skipped"].append({"path": str(path), "kind": kind, "reason": reason})
    log.warning("skipped %s: %s", kind, reason)


# ---- decoding (runs in worker processes or inline) -------------------------------------------

def decode_item(i: int, path: Path, kind: str, resolution: int, opts: BuildOptions) -> Iterator[tuple]:
    """Messages for input ``i``: ``("window", i, (F, R, R, 3) uint8)`` ... then ``("end", i, info)``
    for a video; ``("image", i, (R, R, 3) uint8)`` for an image; ``("error", i, reason)`` when the
    file fails (possibly after some windows, which the consumer then discards)."""
    try:
        if kind == "image":
            yield ("image", i, read_image(path, resolution))
            return
        counts = {"decoded": 0}
        frames = iter_video(path, opts.stride, resolution, counts)
        for window, info in clip_windows(frames, opts.frames, opts.short):
            if window is None:
                yield ("end", i, {**info, **counts})
            else:
                yield ("window", i, window)
    except DataError as e:
        yield ("error", i, str(e))
    except Exception as e:  # a decoder bug must not end a long run: skip the file, say why
        yield ("error", i, f"{path}: unexpected {type(e).__name__}: {e}")


def _exit_with_parent(parent: int) -> None:
    """A worker whose main process was killed (SIGKILL skips cleanup) must not linger, e.g.
    blocked at exit flushing its queue into a pipe nobody reads."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def _worker(items: list[tuple[int, str, str]], resolution: int, opts: BuildOptions, q, parent: int) -> None:
    import threading

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    for i, path, kind in items:
        for msg in decode_item(i, Path(path), kind, resolution, opts):
            q.put(msg)  # blocks while the main process is behind (bounded memory)


class _Decoders:
    """Yields each input's messages in input order, from worker processes or inline."""

    def __init__(self, items: list[tuple[int, Path, str]], resolution: int, opts: BuildOptions):
        self.items, self.resolution, self.opts = items, resolution, opts
        self.procs, self.queues = [], []
        w = min(opts.workers, len(items))
        if w > 0:
            # fork (as torch's DataLoader does): workers only use PyAV/PIL/numpy, never torch or
            # CUDA, and start without re-importing the caller's __main__ (spawn's cost)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            for k in range(w):
                q = ctx.Queue(maxsize=opts.queue_size)
                mine = [(i, str(p), kind) for i, p, kind in items[k::w]]
                p = ctx.Process(target=_worker, args=(mine, resolution, opts, q, os.getpid()), daemon=True)
                p.start()
                self.procs.append(p)
                self.queues.append(q)

    def messages(self, pos: int) -> Iterator[tuple]:
        """Messages of ``items[pos]``, ending with its final message."""
        i, path, kind = self.items[pos]
        if not self.procs:
            yield from decode_item(i, path, kind, self.resolution, self.opts)
            return
        k = pos % len(self.procs)
        while True:
            try:
                msg = self.queues[k].get(timeout=1.0)
            except queue.Empty:
                if not self.procs[k].is_alive():
                    raise DataError(f"decoder process {k} died (exit code {self.procs[k].exitcode}) "
                                    f"while decoding {path}") from None
                continue
            assert msg[1] == i, (msg[1], i)
            yield msg
            if msg[0] != "window":
                return

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


# ---- the build ---------------------------------------------------------------------------

@dataclass
class _Unit:
    start: int  # first input index of the unit
    end: int = -1  # one past its last input (set when it is committed)
    kind: str = "video"
    ok: bool = True
    seqs: list = field(default_factory=list)
    stats: dict = field(default_factory=new_stats)


def inputs_digest(items: list[tuple[int, Path, str]]) -> str:
    h = hashlib.sha256()
    for _, p, kind in items:
        h.update(f"{kind}\0{p}\n".encode())
    return h.hexdigest()


def list_items(inputs: list[str | Path]) -> list[tuple[int, Path, str]]:
    """``(index, path, kind)`` of every input: videos first, then images, each sorted."""
    videos, images = find_media(inputs)
    items = [(i, p, "video") for i, p in enumerate(videos)]
    items += [(len(videos) + j, p, "image") for j, p in enumerate(images)]
    if not items:
        raise DataError(f"no videos or images found in {', '.join(map(str, inputs))}")
    return items


def part_ranges(items: list[tuple[int, Path, str]], frames: int, n_parts: int) -> list[tuple[int, int]]:
    """``n_parts`` contiguous ``[start, end)`` ranges of ``items``, cut only where a unit starts
    (any video; an image block), each as near ``len(items) / n_parts`` inputs as the cuts allow.
    A pure function of the input list: every process computes the same split."""
    n = len(items)
    n_videos = sum(kind == "video" for _, _, kind in items)
    block = frames * IMAGE_BLOCK_GROUPS
    cuts = list(range(n_videos + 1)) + list(range(n_videos + block, n, block)) + [n]
    bounds = [0]
    for k in range(1, n_parts):
        target = k * n / n_parts
        j = bisect_left(cuts, target)
        near = min(cuts[max(j - 1, 0):j + 1], key=lambda c: (abs(c - target), c))
        bounds.append(max(near, bounds[-1]))
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


def part_dir(out_dir: str | Path, i: int, n_parts: int) -> Path:
    return Path(out_dir) / PARTS / f"part-{i:05d}-of-{n_parts:05d}"


def _run_config(items: list, resolution: int, opts: BuildOptions) -> dict:
    return {"stride": opts.stride, "short": opts.short, "frames": opts.frames, "resolution": resolution,
            "n_inputs": len(items), "inputs_digest": inputs_digest(items)}


def build_shards(inputs: list[str | Path], tokenizer: Tokenizer, out_dir: str | Path,
                 opts: BuildOptions | None = None, part: tuple[int, int] | None = None) -> dict:
    """Tokenize videos/images under ``inputs`` into shards at ``out_dir``; returns the summary
    (also written to ``out_dir/summary.json``). Holds the folder's lock throughout: a second
    tokenize into the same folder is refused instead of deleting this one's shards.

    ``part=(i, n)``: build only part ``i`` of ``n`` (see the module docstring), then merge if
    every part is complete. Returns the merged summary, or the part's with ``waiting_for``
    listing the parts not yet complete."""
    opts = opts or BuildOptions()
    opts.check()
    items = list_items(inputs)
    run_cfg = _run_config(items, tokenizer.resolution, opts)
    out_dir = Path(out_dir)
    if part is None:
        with dir_lock(out_dir, "toto tokenize"):
            return _build_locked(items, tokenizer, out_dir, opts, run_cfg)
    i, n_parts = part
    if not (n_parts >= 1 and 0 <= i < n_parts):
        raise DataError(f"part {i}/{n_parts}: expected 0 <= i < n")
    done = _finished_folder(out_dir, tokenizer, run_cfg, opts)
    if done is not None:
        return done
    lo, hi = part_ranges(items, opts.frames, n_parts)[i]
    mine = [(k - lo, p, kind) for k, p, kind in items[lo:hi]]
    cfg = {**_run_config(mine, tokenizer.resolution, opts), "part": {"index": i, "of": n_parts, "first_input": lo,
                                                                      "whole": run_cfg}}
    pdir = part_dir(out_dir, i, n_parts)
    with dir_lock(pdir, "toto tokenize part"):
        summary = _build_locked(mine, tokenizer, pdir, opts, cfg)
    merged = merge_parts(out_dir, n_parts, tokenizer, run_cfg, opts)
    if merged is None:
        summary["waiting_for"] = [k for k in range(n_parts) if not _part_complete(out_dir, k, n_parts, run_cfg)]
        return summary
    return {**merged, "this_part": summary}


def _finished_folder(out_dir: Path, tokenizer: Tokenizer, run_cfg: dict, opts: BuildOptions) -> dict | None:
    """The summary of ``out_dir`` when it already holds this run's merged result (a relaunch
    after the merge); an error when it holds something else and neither resume nor overwrite
    was asked; None when the parts are still to be built."""
    if opts.overwrite or not (out_dir / INDEX).exists():
        return None
    idx = read_index(out_dir)
    if (idx.get("complete") and idx["meta"].get("config") == run_cfg and idx.get("tokenizer") == tokenizer.identity()
            and (out_dir / SUMMARY).exists()):  # the merge writes the summary after the index
        summary = {**json.loads((out_dir / SUMMARY).read_text()), "already_complete": True}
        return summary
    if not opts.resume:
        raise DataError(f"{out_dir} already holds token shards; pass resume or overwrite")
    return None


def _part_complete(out_dir: Path, i: int, n_parts: int, run_cfg: dict) -> bool:
    try:
        idx = read_index(part_dir(out_dir, i, n_parts))
    except DataError:
        return False
    return bool(idx.get("complete")) and idx["meta"].get("config", {}).get("part", {}).get("whole") == run_cfg


def merge_parts(out_dir: str | Path, n_parts: int, tokenizer: Tokenizer, run_cfg: dict,
                opts: BuildOptions) -> dict | None:
    """If all ``n_parts`` parts of this run are complete, write ``out_dir`` as one process would
    have (their sequences in order, re-cut into ``shard_size`` shards; their statistics summed)
    and delete the parts; returns the summary. None while a part is missing or incomplete, or
    while another process holds the folder (it is merging)."""
    out_dir = Path(out_dir)
    if not all(_part_complete(out_dir, i, n_parts, run_cfg) for i in range(n_parts)):
        return None
    try:
        with dir_lock(out_dir, "toto tokenize merge"):
            return _merge_locked(out_dir, n_parts, tokenizer, run_cfg, opts)
    except FolderLockedError:
        log.info("%s: another process is merging the parts", out_dir)
        return None


def _merge_locked(out_dir: Path, n_parts: int, tokenizer: Tokenizer, run_cfg: dict, opts: BuildOptions) -> dict:
    t0 = time.time()
    if not all(_part_complete(out_dir, i, n_parts, run_cfg) for i in range(n_parts)):
        # another process merged them (and deleted them) between our check and our lock
        return _finished_folder(out_dir, tokenizer, run_cfg, BuildOptions(resume=True))
    layout = VocabLayout(n_codes=tokenizer.n_codes)
    geometry = ShardGeometry(tokenizer.grid, opts.frames)
    writer = ShardWriter(out_dir, layout, geometry, tokenizer.identity(), sequences_per_shard=opts.shard_size,
                         overwrite=True)
    (out_dir / SUMMARY).unlink(missing_ok=True)
    stats = new_stats()
    for i in range(n_parts):
        ds = ShardDataset(part_dir(out_dir, i, n_parts))
        if ds.index["tokenizer"] != tokenizer.identity():
            raise DataError(f"{ds.dir} was tokenized with another tokenizer; rebuild it with --overwrite")
        for k in range(len(ds)):
            writer.add(ds[k])
        merge_stats(stats, ds.index["meta"]["stats"])
    writer.meta.update({"config": run_cfg, "cursor": {"next": run_cfg["n_inputs"], "written": 0}, "stats": stats})
    writer.close()
    summary = _finish(out_dir, writer, stats, run_cfg, time.time() - t0, resumed=False,
                      written_now=writer.index["n_sequences"])
    shutil.rmtree(out_dir / PARTS)
    return summary


def _build_locked(items: list, tokenizer: Tokenizer, out_dir: Path, opts: BuildOptions, run_cfg: dict) -> dict:
    from tqdm import tqdm

    res = tokenizer.resolution
    layout = VocabLayout(n_codes=tokenizer.n_codes)
    geometry = ShardGeometry(tokenizer.grid, opts.frames)
    writer = ShardWriter(out_dir, layout, geometry, tokenizer.identity(), sequences_per_shard=opts.shard_size,
                         resume=opts.resume, overwrite=opts.overwrite)
    meta = writer.meta
    if meta.get("config") not in (None, run_cfg):
        diff = {k: (meta["config"].get(k), v) for k, v in run_cfg.items() if meta["config"].get(k) != v}
        raise DataError(f"cannot resume {out_dir}: this run differs in {diff} (stored, now); "
                        f"use --overwrite to start again")
    meta["config"] = run_cfg
    cursor = meta.get("cursor", {"next": 0, "written": 0})
    if not opts.resume:
        (out_dir / SUMMARY).unlink(missing_ok=True)
    stats = meta.get("stats") or new_stats()
    t0 = time.time()
    if writer.index.get("complete"):
        log.info("%s is already complete", out_dir)
        return _finish(out_dir, writer, stats, run_cfg, time.time() - t0, resumed=True, already=True)
    if cursor["next"] == 0 and cursor["written"] == 0 and writer.index["n_sequences"]:
        raise DataError(f"cannot resume {out_dir}: it holds sequences but no build cursor")

    resumed = opts.resume and (cursor["next"] > 0 or writer.index["n_sequences"] > 0)
    skip_first = cursor["written"]  # sequences of the first unit that are already in shards
    pending: list[tuple] = []  # ("window", unit, frames, kind) | ("commit", unit)
    pending_frames = 0
    n_written_now = [0]

    def commit(unit: _Unit) -> None:
        nonlocal skip_first
        if unit.ok:
            unit.stats["sequences_" + unit.kind] += len(unit.seqs)
            unit.stats["sequences"] += len(unit.seqs)
            unit.stats["tokens"] += len(unit.seqs) * geometry.seq_len
            first = skip_first if unit.start == cursor["next"] else 0
            for k in range(first, len(unit.seqs)):
                meta["cursor"] = {"next": unit.start, "written": k + 1}
                meta["stats"] = stats
                writer.add(unit.seqs[k])
                n_written_now[0] += 1
        else:  # a failed file contributes only its skip record, not its frame counts
            unit.stats = {k: v for k, v in unit.stats.items() if "skip" in k}
        skip_first = 0
        merge_stats(stats, unit.stats)
        meta["cursor"] = {"next": unit.end, "written": 0}
        meta["stats"] = stats

    def drain() -> None:
        nonlocal pending, pending_frames
        wins = [e for e in pending if e[0] == "window"]
        codes = None
        if wins:
            frames = np.concatenate([e[2] for e in wins])  # (n * F, R, R, 3) uint8
            codes = tokenizer.encode(frames).reshape(len(wins), opts.frames, *geometry.grid)  # (n, F, h, w)
        k = 0
        for e in pending:
            if e[0] == "window":
                e[1].seqs.append(layout.sequence(codes[k], e[3]))
                e[1].stats["frames_tokenized"] += opts.frames
                k += 1
            else:
                commit(e[1])
        pending, pending_frames = [], 0

    def push(event: tuple) -> None:
        nonlocal pending_frames
        pending.append(event)
        if event[0] == "window":
            pending_frames += len(event[2])
        if pending_frames >= opts.batch_frames:
            drain()

    todo = items[cursor["next"]:]
    decoders = _Decoders(todo, res, opts)
    bar = tqdm(total=len(items), initial=cursor["next"], unit="file", disable=not opts.progress,
               desc=f"part {run_cfg['part']['index']}/{run_cfg['part']['of']}" if "part" in run_cfg else "tokenize",
               dynamic_ncols=True)
    image_unit: _Unit | None = None
    group: list[np.ndarray] = []
    first_image = sum(kind == "video" for _, _, kind in items)
    image_block = opts.frames * IMAGE_BLOCK_GROUPS
    try:
        for pos, (i, path, kind) in enumerate(todo):
            if kind == "video":
                unit = _Unit(start=i, end=i + 1, kind="video")
                for msg in decoders.messages(pos):
                    if msg[0] == "window":
                        push(("window", unit, msg[2], "video"))
                    elif msg[0] == "end":
                        info = msg[2]
                        unit.stats["video_frames_kept"] += info["kept"]
                        unit.stats["video_frames_decoded"] += info["decoded"]
                        unit.stats["padded_frames"] += info["padded"]
                        if info["windows"] == 0:
                            unit.ok = False
                            _skip(unit.stats, "video", path, f"{path}: shorter than one sequence "
                                  f"({info['kept']} kept frames < {opts.frames}; --short skip)")
                        else:
                            unit.stats["videos"] += 1
                            unit.stats["dropped_tail_frames"] += info["dropped"]
                    else:  # error, possibly after some windows: the whole video is skipped
                        unit.ok = False
                        _skip(unit.stats, "video", path, msg[2])
                push(("commit", unit))
            else:
                if (i - first_image) % image_block == 0 and image_unit is not None:  # a block ends
                    image_unit.end = i
                    image_unit.stats["leftover_images"] += len(group)
                    push(("commit", image_unit))
                    image_unit, group = None, []
                if image_unit is None:
                    image_unit = _Unit(start=i, kind="image")
                msg = next(iter(decoders.messages(pos)))
                if msg[0] == "image":
                    image_unit.stats["images"] += 1
                    group.append(msg[2])
                else:
                    _skip(image_unit.stats, "image", path, msg[2])
                if len(group) == opts.frames:
                    image_unit.end = i + 1
                    push(("window", image_unit, np.stack(group), "image"))
                    push(("commit", image_unit))
                    image_unit, group = None, []
            bar.update(1)
            bar.set_postfix(seqs=writer.n_sequences + len([e for e in pending if e[0] == "window"]))
        if image_unit is not None:  # leftover images (fewer than one sequence) or only bad ones
            image_unit.end = len(items)
            image_unit.stats["leftover_images"] += len(group)
            push(("commit", image_unit))
        drain()
    finally:
        bar.close()
        decoders.close()
    meta["cursor"] = {"next": len(items), "written": 0}
    meta["stats"] = stats
    writer.close()
    return _finish(out_dir, writer, stats, run_cfg, time.time() - t0, resumed=resumed, written_now=n_written_now[0])


def _finish(out_dir: Path, writer: ShardWriter, stats: dict, run_cfg: dict, seconds: float,
            resumed: bool, already: bool = False, written_now: int = 0) -> dict:
    summary = {**{k: v for k, v in stats.items() if k != "skipped"},
               "skipped": stats["skipped"], "shards": len(writer.index["shards"]),
               "seq_len": writer.geometry.seq_len, "vocab_size": writer.layout.vocab_size,
               "config": run_cfg, "resumed": resumed, "already_complete": already,
               "sequences_written_this_run": written_now, "seconds_this_run": round(seconds, 3)}
    assert summary["sequences"] == writer.index["n_sequences"], (summary["sequences"], writer.index["n_sequences"])
    atomic_write_json(Path(out_dir) / SUMMARY, summary)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"videos {s['videos']} (skipped {s['videos_skipped']}), images {s['images']} "
             f"(skipped {s['images_skipped']}, left over {s['leftover_images']})",
             f"frames: decoded {s['video_frames_decoded']}, kept {s['video_frames_kept']}, padded "
             f"{s['padded_frames']}, dropped tails {s['dropped_tail_frames']}, tokenized {s['frames_tokenized']}",
             f"sequences {s['sequences']} (video {s['sequences_video']}, image {s['sequences_image']}) of "
             f"{s['seq_len']} tokens = {s['tokens']:,} tokens in {s['shards']} shard(s)"]
    for reason, n in sorted(s["skip_reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  skipped {n} x {reason}")
    return "\n".join(lines)


