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

import numpy as np
import torch

from ..errors import DataError
from ..ioutil import atomic_write_bytes

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

    def paths(self, split: str) -> list[str]:
        """The files ``split`` holds after ``read``, in its order (unreadable ones left out)."""
        bad = {x["path"] for x in self.tokens[split].skipped}
        paths = [str(s.path) for s in self.ds.splits[split] if str(s.path) not in bad]
        if len(paths) != len(self.tokens[split].labels):
            raise DataError(f"{self.data}: {len(paths)} readable {split} samples but "
                            f"{len(self.tokens[split].labels)} token sequences")
        return paths

    def save_predictions(self, path: Path, logits: torch.Tensor, split: str = "val") -> None:
        """One ``.npz`` (atomically): ``logits (N, C)``, ``labels (N,)``, the samples' ``paths``
        and the ``classes`` (index -> label text), for metrics beyond top-k (e.g. toto.eval.cater)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, logits=logits.numpy(), labels=np.asarray(self.tokens[split].labels),
                 paths=np.array(self.paths(split)), classes=np.array(self.ds.classes))
        atomic_write_bytes(path, buf.getvalue())

    def heads(self, dim: int, n_heads: int) -> dict[str, tuple[int, torch.nn.Module]]:
        return probe_heads(dim, len(self.ds.classes), self.probes, self.n_heads or n_heads, self.norm, self.seed)
