"""Classification of labelled images or videos: the task behind ``toto probe --online`` and
``toto finetune`` (digits, ImageNet, Kinetics, CATER's snitch cells), and the worked example of
docs/framework.md.

    reader:  class folders or list files (toto.data.lists.scan_dataset) -> token sequences
             [start] + codes + [end], encoded once into the token cache, and class ids
    heads:   attentive (the paper's probe) or average-pooling probes, each on one layer
    metric:  top-1 / top-5 / cross-entropy (toto.tasks.base.Task's defaults)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.lists import scan_dataset
from ..eval.features import SequenceSpec, tokenize_splits
from .base import Split, Task
from .heads import probe_heads


class ClassifyTask(Task):
    """``heads``: name -> (layer, pooling); ``n_heads`` 0: the model's attention head count."""

    def __init__(self, data: str | Path, heads: dict[str, tuple[int, str]], *, frames: int = 16, stride: int = 4,
                 clip: str = "center", max_per_class: int | None = None, n_heads: int = 0, norm: str = "batchnorm",
                 seed: int = 0, batch_size: int = 32):
        self.data, self.probes, self.max_per_class = data, heads, max_per_class
        self.n_heads, self.norm, self.seed, self.batch_size = n_heads, norm, seed, batch_size
        self.ds = scan_dataset(data, max_per_class)
        self.spec = SequenceSpec(self.ds.kind, frames, stride, clip)

    def identity(self) -> dict:
        return {"data": str(Path(self.data).resolve()), "classes": self.ds.classes, "sequence": self.spec.to_dict(),
                "max_per_class": self.max_per_class}

    def read(self, tokenizer, layout, identity: dict, cache: Path, progress: bool) -> dict[str, Split]:
        self.tokens, self.cache = tokenize_splits(self.ds, tokenizer, layout, self.spec, identity, cache,
                                                  batch_size=self.batch_size, progress=progress)
        return {s: Split(t.labels, t.tokens) for s, t in self.tokens.items()}

    def heads(self, dim: int, n_heads: int) -> dict[str, tuple[int, torch.nn.Module]]:
        return probe_heads(dim, len(self.ds.classes), self.probes, self.n_heads or n_heads, self.norm, self.seed)
