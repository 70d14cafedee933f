"""The one way an evaluation loads a pre-trained Toto: checkpoint + tokenizer, checked to belong
together, and the random-init baseline of the same architecture.

A model reads the codes of the tokenizer it was pre-trained with; another tokenizer of the
same shape (other codebook or network) gives codes the model never saw, and the evaluation
silently measures noise. So every evaluation (probe, probe --online, finetune, track,
forecast, cater, anticipate, robot) loads through ``load_backbone``, which refuses, with one
``CheckpointError`` line naming the checkpoint and the difference:

- a tokenizer other than the one recorded in the checkpoint (kind, codebook size, downsampling,
  resolution, content hash of the weights: ``toto.tokenizers.base.check_identity``);
- a vocabulary that is not the model's (size and layout of the special and code ids);
- sequences longer than the model's context (frames x the tokenizer's grid).

The paper's baseline (arXiv 2501.05453, Sec. 4) is the same architecture at random
initialisation: ``Backbone.random_init`` draws it as the Trainer draws a run's step-0 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from ..vocab import N_SPECIAL, VocabLayout
from .features import SequenceSpec, file_identity


def check_compatible(model_cfg, state: dict, tokenizer, spec: SequenceSpec, where: str) -> VocabLayout:
    """Refuse a checkpoint whose tokenizer (kind, size, resolution, weights), vocabulary or
    context differs from this tokenizer's sequences -> the vocabulary layout to build them with."""
    from ..tokenizers.base import check_identity

    check_identity(state.get("tokenizer"), tokenizer, f"checkpoint {where}", CheckpointError)
    layout = VocabLayout(n_codes=tokenizer.n_codes)
    if model_cfg.vocab_size != layout.vocab_size:
        raise CheckpointError(
            f"{where}: model vocabulary is {model_cfg.vocab_size} ids but the tokenizer has "
            f"{tokenizer.n_codes} codes (+{N_SPECIAL} specials = {layout.vocab_size}); use the tokenizer "
            f"the model was trained with")
    saved = state.get("vocab")
    if saved and VocabLayout.from_dict(saved) != layout:
        raise CheckpointError(f"{where}: the checkpoint's vocabulary layout {saved} differs from {layout.to_dict()}")
    h, w = tokenizer.grid
    n_frames = spec.frames if spec.kind == "video" else 1
    need = 1 + n_frames * h * w
    if need > model_cfg.max_seq_len:
        raise CheckpointError(
            f"{where}: a {spec.kind} sequence of {n_frames} frame(s) x {h}x{w} codes needs {need} positions "
            f"but the model context is max_seq_len={model_cfg.max_seq_len}; use fewer frames, or extend the "
            f"context first (`toto train --init-from` on shards that long: docs/training.md)")
    return layout


def random_init(cfg, device="cpu", seed: int | None = None) -> nn.Module:
    """The random-init baseline of a run config ``cfg`` (toto.config.Config): the same
    architecture drawn as the Trainer draws step 0 (``torch.manual_seed(seed)``, default the
    run's own ``train.seed``), in eval mode."""
    from ..model.llama import Toto

    torch.manual_seed(cfg.train.seed if seed is None else seed)
    return Toto(cfg.model).to(device).eval()


@dataclass
class Backbone:
    """A checkpoint and the tokenizer it was trained with, checked to belong together, on the
    job's device."""

    path: Path  # the checkpoint folder (a run folder resolves to its latest checkpoint)
    model: nn.Module  # eval mode
    cfg: object  # toto.config.Config of the run
    state: dict  # the checkpoint's state.json (+ "path")
    tokenizer: object
    layout: VocabLayout
    tok_id: dict  # the tokenizer's identity and file: part of every cache key and run identity

    @property
    def identity(self) -> dict:
        """What a cache or a resumed job must match: the weights file and step."""
        return {"checkpoint": file_identity(self.path / "model.safetensors"), "step": self.state.get("step")}

    @property
    def n_layers(self) -> int:
        return self.cfg.model.n_layers

    def check_layers(self, layers, option: str = "--layer") -> list[int]:
        """Layer indices ``0..n_layers`` (0: the embeddings, l: the output of block l); ConfigError
        naming ``option`` otherwise."""
        layers = list(layers)
        bad = [l for l in layers if not 0 <= l <= self.n_layers]
        if bad or not layers:
            raise ConfigError(f"{option} {', '.join(map(str, bad)) or '(none)'} out of range: this model has "
                              f"layers 0..{self.n_layers}")
        return layers

    def random_init(self, seed: int | None = None) -> nn.Module:
        return random_init(self.cfg, self.model.head.weight.device, seed)

    def models(self, with_random_init: bool) -> dict[str, tuple[nn.Module, dict]]:
        """``{"trained": (model, identity)}`` and, with ``with_random_init``, the baseline with
        its identity (the architecture and seed)."""
        out = {"trained": (self.model, self.identity)}
        if with_random_init:
            out["random_init"] = (self.random_init(),
                                  {"random_init": dict(self.cfg.model.__dict__), "seed": self.cfg.train.seed})
        return out


def load_backbone(checkpoint: str | Path, tokenizer: str | Path, spec: SequenceSpec, device) -> Backbone:
    """Load ``checkpoint`` (a checkpoint or run folder) and ``tokenizer`` (a tokenizer file) on
    ``device`` and check them against each other and the sequences ``spec`` describes (see the
    module docstring); CheckpointError on any mismatch."""
    from ..tokenizers.base import get_tokenizer
    from ..train.checkpoint import load_model, resolve_checkpoint

    tok = get_tokenizer(tokenizer, device=str(device))
    path = resolve_checkpoint(checkpoint)
    model, cfg, state = load_model(path, device)
    layout = check_compatible(cfg.model, state, tok, spec, str(path))
    return Backbone(path, model, cfg, state, tok, layout, {**tok.identity(), "file": file_identity(tokenizer)})
