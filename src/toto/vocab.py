"""The one place that defines special tokens and the vocabulary layout.

Layout (recorded in every shard index and checked by the loader):

    id 0            pad (never a training target; reserved)
    id 1            [1] start of a video sequence
    id 2            [2] end of any sequence
    id 3            [3] start of an image sequence
    id 4 .. 4+K-1   visual codes 0 .. K-1 of the tokenizer (K = 8192 for the DALL-E dVAE)

Keeping the paper's numbers ([1], [2], [3]; arXiv 2501.05453) as the literal ids means a
sequence printed from a shard reads like the paper; the visual codes are shifted by ``CODE_OFFSET``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PAD = 0
VIDEO_START = 1
END = 2
IMAGE_START = 3
N_SPECIAL = 4
CODE_OFFSET = N_SPECIAL
DALLE_CODES = 8192


@dataclass(frozen=True)
class VocabLayout:
    """How token ids map to specials and visual codes for a tokenizer with ``n_codes`` codes."""

    n_codes: int = DALLE_CODES
    n_special: int = N_SPECIAL
    code_offset: int = CODE_OFFSET
    pad: int = PAD
    video_start: int = VIDEO_START
    end: int = END
    image_start: int = IMAGE_START

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.n_codes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab_size"] = self.vocab_size
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**fields)

    def codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        """Visual codes (any int array, values in [0, n_codes)) -> token ids (uint16 when they fit)."""
        codes = np.asarray(codes)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise ValueError(f"visual codes must lie in [0, {self.n_codes}); got range "
                             f"[{codes.min()}, {codes.max()}]")
        return (codes.astype(np.int64) + self.code_offset).astype(token_dtype(self.vocab_size))

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Token ids -> visual codes; raises if any id is a special token."""
        ids = np.asarray(ids).astype(np.int64)
        if ids.size and (ids.min() < self.code_offset or ids.max() >= self.vocab_size):
            raise ValueError("token ids contain special tokens or ids beyond the vocabulary")
        return ids - self.code_offset

    def sequence(self, codes: np.ndarray, kind: str) -> np.ndarray:
        """Wrap frames' codes ``(F, h, w)`` in [start] ... [end] as one flat sequence of ids."""
        start = {"video": self.video_start, "image": self.image_start}.get(kind)
        if start is None:
            raise ValueError(f"sequence kind must be 'video' or 'image', got {kind!r}")
        body = self.codes_to_ids(np.asarray(codes).reshape(-1))
        dt = token_dtype(self.vocab_size)
        return np.concatenate([np.array([start], dt), body, np.array([self.end], dt)])


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    raise ValueError(f"vocabulary of {vocab_size} ids does not fit uint16 token shards")


def sequence_length(frames_per_sequence: int, tokens_per_frame: int) -> int:
    """Stored length of one sequence: start token + frames' codes + end token."""
    return 2 + frames_per_sequence * tokens_per_frame
