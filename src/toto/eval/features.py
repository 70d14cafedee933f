"""Labelled media -> per-layer token features of a frozen model, cached on disk.

Dataset layouts (``root`` holds a ``train`` and a ``val`` split, each one of):

    root/train/<class>/*.jpg|png|...        images in class folders (ImageNet layout)
    root/train/<class>/*.mp4|webm|...       videos in class folders (Kinetics layout)
    root/train.txt                          a list file: one ``path label`` per line, paths
                                            relative to the list file's folder, label = class
                                            name (the last whitespace-separated field; on a
                                            line with a tab, all after the last tab)

Classes are the sorted class names of the train split; a val sample of a class the train split
lacks is an error. An image becomes one image sequence ``[3] + codes`` (H/d x W/d codes); a
video becomes ``[1] + codes`` of its first ``frames`` kept frames (stride and resize as in
pre-training, short videos padded by repeating the last frame). The final ``[2]`` is not fed:
the features of every visual code position are kept, ``(T, D)`` per sample, T = frames x grid.

Cache folder (toto.eval.cache: one per model x tokenizer x dataset x settings; ``manifest.json``
records the identity that produced it, which chunks are done, so a killed extraction resumes,
and a checksum per array, checked at every read):

    <cache>/manifest.json
    <cache>/<split>_<chunk:05d>.safetensors   "layer<i>": (n, T, D) float16, "labels": (n,) int64,
                                              "sample": (n,) int64 (index into the split list)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.images import read_image
from ..data.lists import LabelledDataset, Sample
from ..data.video import clip_windows, frame_count_hint, iter_video
from ..errors import ConfigError, DataError
from ..train.optim import autocast_for
from ..vocab import VocabLayout, token_dtype
from .cache import ChunkCache

CACHE_VERSION = 2  # 2: a checksum per array (toto.eval.cache)
TOKEN_CACHE_VERSION = 2


# -- media -> token sequences -----------------------------------------------------------------

CLIPS = ("center", "first", "last")


@dataclass(frozen=True)
class SequenceSpec:
    """How a sample becomes model input: media kind, frames per video, temporal stride, and
    which window of a longer video (``center``: the middle one, the usual single-clip test;
    ``last``: the one ending at the video's last frame, where CATER's label is)."""

    kind: str
    frames: int = 16
    stride: int = 4
    clip: str = "center"

    def __post_init__(self):
        if self.clip not in CLIPS:
            raise ConfigError(f"--clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")

    def to_dict(self) -> dict:
        video = self.kind == "video"
        return {"kind": self.kind, "frames": self.frames if video else 1,
                "stride": self.stride if video else None, "clip": self.clip if video else None}


def read_frames(path: Path, spec: SequenceSpec, resolution: int) -> np.ndarray:
    """``frames: (F, R, R, 3) uint8`` of one sample (F = 1 for an image); DataError if unreadable."""
    if spec.kind == "image":
        return read_image(path, resolution)[None]
    if spec.clip == "last":
        return _last(path, spec, resolution)
    kept = iter_video(path, spec.stride, resolution)
    if spec.clip == "center":
        kept = _middle(kept, spec.frames, frame_count_hint(path), spec.stride)
    window, _ = next(clip_windows(kept, spec.frames, "pad"))
    if window is None:
        raise DataError(f"{path}: no decodable video frames")
    return window


def _last(path: Path, spec: SequenceSpec, resolution: int) -> np.ndarray:
    """The ``frames`` frames ``stride`` apart that end at the last decoded frame (padded at the
    start by repeating the first when the video is too short)."""
    span = (spec.frames - 1) * spec.stride + 1
    tail = list(collections.deque(iter_video(path, 1, resolution), maxlen=span))
    window = tail[::-1][::spec.stride][::-1]
    return np.stack([window[0]] * (spec.frames - len(window)) + window)


def _middle(kept, length: int, n_frames: int | None, stride: int):
    """The middle ``length`` kept frames. With the container's frame count, decoding stops after
    the window; without it (or if the count was wrong and the video ends early) the last
    ``length`` frames decoded so far are the fallback, padded by clip_windows if too few."""
    if n_frames is None:
        frames = list(kept)
        start = max(0, (len(frames) - length) // 2)
        yield from frames[start:start + length]
        return
    skip = max(0, (-(-n_frames // stride) - length) // 2)
    last = collections.deque(maxlen=length)
    for i, f in enumerate(kept):
        last.append(f)
        if i >= skip + length - 1:
            break
    yield from last


def to_sequence(codes: np.ndarray, layout: VocabLayout, kind: str) -> np.ndarray:
    """``codes: (F, h, w)`` -> model input ids ``(1 + F*h*w,)``: start token + codes, no end token."""
    return layout.sequence(codes, kind)[:-1].astype(np.int64)


def code_features(hidden: torch.Tensor) -> torch.Tensor:
    """Residual stream ``(B, 1 + T, D)`` of ``[start] + codes`` -> the probe's features
    ``(B, T, D) float16``: the visual code positions only (cached and online probing alike)."""
    return hidden[:, 1:].to(torch.float16)


def iter_codes(samples: list[Sample], indices: list[int], tokenizer, spec: SequenceSpec, batch_size: int,
               skipped: list, bar=None):
    """Read and tokenize samples, ``batch_size`` at a time (one tokenizer call per batch).

    Yields ``(codes: (B, F, h, w), labels, indices)``; a file that cannot be read is appended to
    ``skipped`` as ``{"path", "reason"}`` and left out. ``bar`` (tqdm) advances per sample."""
    clips, labels, kept = [], [], []
    res = tokenizer.resolution
    for i, (s, idx) in enumerate(zip(samples, indices)):
        try:
            clips.append(read_frames(s.path, spec, res))  # (F, R, R, 3) uint8
            labels.append(s.label)
            kept.append(idx)
        except DataError as e:
            skipped.append({"path": str(s.path), "reason": str(e)})
        if bar is not None:
            bar.update(1)
        if clips and (len(clips) == batch_size or i == len(samples) - 1):
            n_frames = len(clips[0])
            codes = tokenizer.encode(np.concatenate(clips))  # (B*F, h, w)
            yield codes.reshape(len(clips), n_frames, *codes.shape[1:]), labels, kept
            clips, labels, kept = [], [], []


# -- extraction and cache ---------------------------------------------------------------------

def file_identity(path: str | Path) -> dict:
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def dataset_identity(ds: LabelledDataset) -> dict:
    """What a cache of ``ds`` must match: root, classes, and each split's files (sizes, times)."""
    return {"root": str(ds.root.resolve()), "classes": ds.classes, **{s: ds.fingerprint(s) for s in ds.splits}}


@dataclass
class SplitFeatures:
    """One split's cached features; ``layer(i)`` loads ``(N, T, D) float16`` for one layer only."""

    cache: ChunkCache
    split: str
    labels: torch.Tensor  # (N,) int64

    def layer(self, i: int) -> torch.Tensor:
        return self._load(f"layer{i}")

    def samples(self) -> torch.Tensor:
        """``(N,)`` index of each row into the split's samples (unreadable files have no row)."""
        return self._load("sample")

    def _load(self, key: str) -> torch.Tensor:
        return torch.cat([torch.from_numpy(self.cache.read(r, key)) for r in self.cache.records(self.split)])


class FeatureExtractor:
    """Runs a frozen model over a labelled dataset and caches the hidden states of ``layers``."""

    def __init__(self, model, layout: VocabLayout, tokenizer, spec: SequenceSpec, layers: list[int],
                 identity: dict, device: torch.device, batch_size: int = 32, chunk_size: int = 512,
                 progress: bool = True):
        self.model, self.layout, self.tokenizer, self.spec = model, layout, tokenizer, spec
        self.layers, self.identity, self.device = sorted(set(layers)), identity, device
        self.batch_size, self.chunk_size, self.progress = batch_size, chunk_size, progress

    def run(self, ds: LabelledDataset, cache_root: str | Path) -> tuple[dict[str, SplitFeatures], dict]:
        """Extract (or reuse) both splits; returns their features and the manifest."""
        cache = ChunkCache(cache_root, {**self.identity, "version": CACHE_VERSION, "sequence": self.spec.to_dict(),
                                        "layers": self.layers, "chunk_size": self.chunk_size,
                                        "dataset": dataset_identity(ds)}, ds.splits)
        for split, samples in ds.splits.items():
            self._extract_split(split, samples, cache)
        cache.finish()
        out = {}
        for split in ds.splits:
            labels = [l for r in cache.records(split) for l in r["labels"]]
            out[split] = SplitFeatures(cache, split, torch.tensor(labels, dtype=torch.long))
        return out, cache.manifest

    def _extract_split(self, split: str, samples: list[Sample], cache: ChunkCache) -> None:
        state = cache.part(split)
        todo = cache.todo(split, -(-len(samples) // self.chunk_size))
        done = len(samples) - sum(len(samples[c * self.chunk_size:(c + 1) * self.chunk_size]) for c in todo)
        bar = tqdm(total=len(samples), initial=done, desc=f"features {split}", unit=self.spec.kind,
                   disable=not self.progress or not todo, dynamic_ncols=True)
        try:
            for c in todo:
                idx = range(c * self.chunk_size, min(len(samples), (c + 1) * self.chunk_size))
                feats, labels, kept = self._chunk([samples[i] for i in idx], list(idx), state, bar)
                arrays = {f"layer{l}": torch.cat(feats[l]).numpy() for l in self.layers} if kept else {}
                cache.put(split, c, {**arrays, "labels": np.asarray(labels, np.int64),
                                     "sample": np.asarray(kept, np.int64)}, len(kept), labels=labels)
        finally:
            bar.close()

    @torch.no_grad()
    def _chunk(self, samples: list[Sample], indices: list[int], state: dict, bar):
        feats: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        labels, kept = [], []
        ctx = autocast_for(self.device)
        for codes, batch_labels, batch_kept in iter_codes(samples, indices, self.tokenizer, self.spec,
                                                          self.batch_size, state["skipped"], bar):
            seqs = [to_sequence(c, self.layout, self.spec.kind) for c in codes]
            tokens = torch.from_numpy(np.stack(seqs)).to(self.device)  # (B, 1 + T)
            with ctx:
                hidden = self.model.hidden_states(tokens, self.layers)
            for l in self.layers:
                feats[l].append(code_features(hidden[l]).cpu())  # (B, T, D)
            labels += batch_labels
            kept += batch_kept
        return feats, labels, kept


# -- token sequences, encoded once per split and cached (toto finetune, toto probe --online) ---------------------------------------

@dataclass
class SplitTokens:
    tokens: np.ndarray  # (N, L) uint16: [start] + codes + [end], as in pre-training shards
    labels: np.ndarray  # (N,) int64
    skipped: list[dict]  # {"path", "reason"} of files that could not be read


def tokenize_splits(ds: LabelledDataset, tokenizer, layout, spec: SequenceSpec, identity: dict,
                    cache_root: str | Path, batch_size: int = 32, chunk_size: int = 1024,
                    progress: bool = True) -> tuple[dict[str, SplitTokens], Path]:
    """Encode every sample of both splits once; reruns with the same dataset, tokenizer and
    settings reuse the cache, and a killed encoding resumes at its first unfinished chunk.

    Cache ``<root>/<key>/``: ``manifest.json`` (identity, chunks done, skipped files) and
    ``<split>_<chunk:05d>.safetensors`` with ``tokens: (n, L)`` and ``labels: (n,) int64``."""
    cache = ChunkCache(cache_root, {**identity, "version": TOKEN_CACHE_VERSION, "sequence": spec.to_dict(),
                                    "vocab": layout.to_dict(), "chunk_size": chunk_size,
                                    "dataset": dataset_identity(ds)}, ds.splits)
    length = 2 + (spec.frames if spec.kind == "video" else 1) * tokenizer.grid[0] * tokenizer.grid[1]
    out = {}
    for split, samples in ds.splits.items():
        state = cache.part(split)
        todo = cache.todo(split, -(-len(samples) // chunk_size))
        bar = tqdm(total=len(samples), initial=len(samples) - sum(
            len(samples[c * chunk_size:(c + 1) * chunk_size]) for c in todo),
            desc=f"tokenize {split}", unit=spec.kind, disable=not progress or not todo, dynamic_ncols=True)
        for c in todo:
            idx = list(range(c * chunk_size, min(len(samples), (c + 1) * chunk_size)))
            seqs, labels = [], []
            for codes, lab, _ in iter_codes([samples[i] for i in idx], idx, tokenizer, spec, batch_size,
                                            state["skipped"], bar):
                seqs += [layout.sequence(x, spec.kind) for x in codes]  # (F, h, w) -> (L,)
                labels += lab
            cache.put(split, c, {"tokens": np.stack(seqs), "labels": np.asarray(labels, np.int64)} if seqs else {},
                      len(seqs))
        bar.close()
        tokens = cache.concat(split, "tokens", np.zeros((0, length), token_dtype(layout.vocab_size)))
        labels = cache.concat(split, "labels", np.zeros(0, np.int64))
        out[split] = SplitTokens(tokens, labels, list(state["skipped"]))
    cache.finish()
    return out, cache.folder
