"""The downstream-task framework: a task is a data reader, a head and a metric; this module is
everything else, the same for every task.

The paper evaluates a pre-trained Toto three ways (arXiv 2501.05453, Sec. 4): attentive probes
on frozen features, fine-tuning with the next-token loss kept as an auxiliary term, and the same
architecture at random initialisation as the baseline. Here that is one loop:

    Split (token sequences (N, L) or cached features, targets (N,))
      -> TaskModel: trunk (frozen, fine-tuned or absent) -> the layers the heads read
                    -> heads (B, C) -> task loss per sample (+ ntp_weight x next-token NLL)
      -> fit(): warm-up + cosine per step, AdamW, clipping, one epoch at a time, then val
         (sharded, every rank the same number of forwards), metrics.jsonl, per-epoch state

Distributed like pre-training (``toto.train.distributed``): under torchrun every rank takes
rows ``rank::world`` of each global batch, the loss is scaled so DDP's gradient average is the
global batch mean, BatchNorm statistics span the global batch (``GlobalBatchNorm1d``), and the
run matches one process up to float rounding. Only rank 0 writes.

The batch order is a pure function of (seed, epoch) and nothing else draws random numbers after
the heads are initialised, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, TrainingError
from ..eval.backbone import Backbone, load_backbone
from ..eval.features import code_features
from ..ioutil import atomic_dir, atomic_write_bytes, atomic_write_json, verify_checksums
from ..jobstate import refuse_changed, trim_metrics
from ..train.distributed import all_sum, world
from ..train.optim import adamw, autocast_for, cosine_lr, param_groups, set_lr, shift_targets

# -- distributed pieces --------------------------------------------------------------------------


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients: each rank's loss
    reaches every rank's inputs through the shared statistics."""

    @staticmethod
    def forward(ctx, x):
        return all_sum(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_sum(grad.clone())


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics span the global batch over all ranks, so two
    ranks normalise as one process does (torch's SyncBatchNorm runs on GPUs only). Alone, or in
    eval mode, it is ``nn.BatchNorm1d`` exactly; the state dict is the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        n = all_sum(torch.tensor(float(len(x)), device=x.device))
        mean = _AllSum.apply(x.sum(0)) / n
        var = _AllSum.apply(((x - mean) ** 2).sum(0)) / n  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
                self.num_batches_tracked += 1
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


# -- data a task's reader produces ----------------------------------------------------------------


@dataclass
class Split:
    """One split as the loop indexes it: ``tokens (N, L)`` ([start] + codes + [end], as in the
    pre-training shards) for a live trunk, or ``features {layer: (N, T, D)}`` from a cache; and
    ``targets (N,)`` (class ids for the classification tasks)."""

    targets: np.ndarray
    tokens: np.ndarray | None = None
    features: dict[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: np.ndarray, device) -> tuple[torch.Tensor | dict, torch.Tensor]:
        y = torch.as_tensor(self.targets[idx]).to(device)
        if self.features is not None:
            t = torch.as_tensor(idx)
            return {layer: f[t].to(device) for layer, f in self.features.items()}, y
        return torch.from_numpy(self.tokens[idx].astype(np.int64)).to(device), y


# -- the model: a trunk and heads on its layers -----------------------------------------------------


class TaskModel(nn.Module):
    """Heads on a trunk's layers, one module, so DDP wraps it whole and one optimizer steps it.

    ``heads``: name -> (layer, module ``(B, T, D) -> (B, C)``). ``trunk``: a Toto, or None when
    the split carries cached features. ``train_trunk``: fine-tune it (else it is frozen, run
    without gradients, and its features are rounded to float16 as cached ones are).
    ``ntp_weight``: the next-token auxiliary loss's weight (None: never computed; 0: measured on
    val only). Blocks a fine-tuned trunk never runs for the loss (above the deepest head when
    ``ntp_weight`` is 0) are frozen, so DDP sees no unused parameters."""

    def __init__(self, heads: dict[str, tuple[int, nn.Module]], trunk: nn.Module | None = None, *,
                 train_trunk: bool = False, ntp_weight: float | None = None, pad: int = -1, dtype: str = "auto"):
        super().__init__()
        self.heads = nn.ModuleDict({name: m for name, (_, m) in heads.items()})
        self.reads = {name: layer for name, (layer, _) in heads.items()}
        self.layers = sorted(set(self.reads.values()))
        self.trunk, self.train_trunk, self.ntp_weight, self.pad, self.dtype = trunk, train_trunk, ntp_weight, pad, dtype
        if trunk is None:
            return
        if not train_trunk:
            trunk.requires_grad_(False)
        elif not ntp_weight:
            used = {id(p) for m in (trunk.tok_emb, *trunk.layers[:max(self.layers)]) for p in m.parameters()}
            for p in trunk.parameters():
                if id(p) not in used:
                    p.requires_grad_(False)

    def forward(self, inputs, with_ntp: bool = False):
        """``inputs``: tokens ``(B, L)`` or cached features -> (``{head: (B, C) float32}``, the
        mean next-token NLL or None)."""
        feats, ntp = self.features(inputs, with_ntp) if self.trunk is not None else (inputs, None)
        return {name: head(feats[self.reads[name]]).float() for name, head in self.heads.items()}, ntp

    def features(self, tokens: torch.Tensor, with_ntp: bool = False):
        """``tokens (B, L)`` -> (``{layer: (B, T, D)}`` at the code positions, the mean next-token
        NLL or None): one trunk pass that stops at the deepest layer read unless the NTP term
        needs the full depth."""
        x, targets = shift_targets(tokens, self.pad)
        grad = torch.enable_grad() if self.train_trunk else torch.no_grad()
        ntp = None
        with grad, autocast_for(tokens.device, self.dtype):
            if with_ntp:
                (_, ntp), hidden = self.trunk(x, targets, layers=self.layers)
            else:
                hidden = self.trunk(x, layers=self.layers, stop_at=max(self.layers))
        if not self.train_trunk:
            return {layer: code_features(h) for layer, h in hidden.items()}, ntp
        return {layer: h[:, 1:] for layer, h in hidden.items()}, ntp

    @torch.no_grad()
    def precompute(self, split: Split, batch_size: int, device, progress: bool = False, desc: str = "") -> Split:
        """The frozen trunk's features of every row of ``split`` (tokens), computed once, for
        heads that then train many epochs without the trunk: ``Split(features=...)``."""
        feats: dict[int, list] = {layer: [] for layer in self.layers}
        for s in tqdm(range(0, len(split), batch_size), desc=f"{desc}features", unit="batch", disable=not progress,
                      leave=False, dynamic_ncols=True):
            tokens, _ = split.batch(np.arange(s, min(s + batch_size, len(split))), device)
            for layer, x in self.features(tokens)[0].items():
                feats[layer].append(x.cpu())
        return Split(split.targets, features={l: torch.cat(v) if v else torch.zeros(0) for l, v in feats.items()})

    def head_state(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: v.detach().contiguous().cpu() for k, v in h.state_dict().items()}
                for name, h in self.heads.items()}


# -- what a task supplies beyond its reader and heads --------------------------------------------


class Task:
    """What a downstream task supplies: ``spec`` (how a sample becomes a token sequence,
    toto.eval.features.SequenceSpec), ``identity()`` (what a resume must match), ``read()`` (its
    data -> splits), ``heads()``; and, if it is not classification, ``loss``, ``correct`` and
    ``metrics`` (the defaults below are classification's). See docs/framework.md."""

    spec = None

    def identity(self) -> dict:
        raise NotImplementedError

    def read(self, tokenizer, layout, identity: dict, cache: Path, progress: bool) -> dict[str, Split]:
        """``{"train": Split, "val": Split}``; ``identity`` (the tokenizer's) keys a token cache."""
        raise NotImplementedError

    def heads(self, dim: int, n_heads: int) -> dict[str, tuple[int, nn.Module]]:
        """name -> (layer read, module ``(B, T, D) -> (B, C)``), freshly drawn (seeded)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(B,)`` per-sample loss (the loop averages over the global batch)."""
        return F.cross_entropy(logits, targets, reduction="none")

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(B,)`` bool: counted as the train accuracy seen during an epoch."""
        return logits.argmax(1) == targets

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        """Scores of a whole split from its ``logits (N, C)``: top-1, top-5 (over 5 classes),
        cross-entropy."""
        t = torch.as_tensor(targets)
        return {"top1": topk_accuracy(logits, t, 1),
                "top5": topk_accuracy(logits, t, 5) if logits.shape[1] > 5 else None,
                "ce": float(F.cross_entropy(logits, t)) if len(t) else float("nan")}


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` bool: is the row's label among its ``k`` largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits."""
    return float(topk_hits(logits, labels, k).float().mean())


# -- the loop ------------------------------------------------------------------------------------


@dataclass
class Loop:
    """What the loop needs to know beyond the optimizer's groups (each with ``base_lr`` and
    optionally ``lr_scale``)."""

    epochs: int
    batch_size: int
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    seed: int = 0
    until: int | None = None  # stop after this epoch; the schedule keeps `epochs`

    def steps(self, n: int, ranks: int = 1) -> tuple[int, int, int, int]:
        """(batch size, steps per epoch, total steps, warm-up steps) for ``n`` train samples
        split over ``ranks``: every rank needs a row of every batch."""
        bs = min(self.batch_size, n)
        if bs < ranks:
            raise ConfigError(f"a batch of {bs} sample(s) cannot be split over {ranks} ranks: raise the batch "
                              f"size or run fewer processes")
        per_epoch = epoch_steps(n, bs, max(2, ranks))
        return bs, per_epoch, per_epoch * self.epochs, round(self.warmup_epochs * per_epoch)


def epoch_steps(n: int, batch_size: int, smallest: int = 2) -> int:
    """Batches in one pass over ``n`` samples; a trailing batch of fewer than ``smallest`` is
    dropped: BatchNorm cannot normalise a single sample, and under torchrun every rank needs a
    row (``smallest`` = the number of ranks)."""
    return max(1, n // batch_size if n % batch_size < smallest else n // batch_size + 1)


def batch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s order of the ``n`` train samples: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class EpochStats:
    epoch: int
    step: int
    lr_factor: float  # the schedule's factor at the epoch's last step (x a group's base lr)
    train_loss: dict[str, float]  # per head, mean over the epoch's samples
    train_correct: dict[str, float]  # per head, fraction of the epoch's samples
    train_ntp: float | None
    last_loss: dict[str, float]  # per head, the epoch's last step (global batch mean)
    val: dict[str, dict]  # per head, Task.metrics of the val split
    val_ntp: float | None
    val_logits: dict[str, torch.Tensor]  # per head, (N_val, C) in split order
    time_s: float


@torch.no_grad()
def predict(model: TaskModel, split: Split, batch_size: int, device, with_ntp: bool = False,
            progress: bool = False, desc: str = "eval") -> tuple[dict[str, torch.Tensor], float | None]:
    """Every head's logits ``(N, C)`` on a split, in its order, on every rank, and the
    token-weighted next-token NLL (``with_ntp``). Rank r evaluates rows ``r::world``; every rank
    runs the same number of forwards (padding batches count zero), so collectives inside the
    model (FSDP) never wait on a rank that ran out of rows."""
    rank, size = world()
    n = len(split)
    mine = np.arange(rank, n, size)
    per_rank = -(-n // size)
    was = model.training
    model.eval()
    outs: dict[str, list] = {name: [] for name in model.heads}
    ntp_sum = torch.zeros(2, dtype=torch.float64, device=device)
    for b in tqdm(range(-(-per_rank // batch_size)), desc=desc, unit="batch", disable=not progress,
                  leave=False, dynamic_ncols=True):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        real = len(idx) > 0
        inputs, _ = split.batch(idx if real else np.arange(min(n, 1)), device)
        logits, ntp = model(inputs, with_ntp=with_ntp)
        if not real:
            continue
        for name, x in logits.items():
            outs[name].append(x.cpu())
        if ntp is not None:
            tokens = len(idx) * (inputs.shape[1] - 1)
            ntp_sum += torch.tensor([float(ntp) * tokens, tokens], dtype=torch.float64, device=device)
    model.train(was)
    all_sum(ntp_sum)
    out = {}
    for name, parts in outs.items():
        local = torch.cat(parts) if parts else torch.zeros(0, 0)
        out[name] = _gather_rows(local, n, rank, size, device)
    return out, (float(ntp_sum[0] / ntp_sum[1]) if with_ntp and ntp_sum[1] > 0 else None)


def _gather_rows(local: torch.Tensor, n: int, rank: int, size: int, device) -> torch.Tensor:
    """Rows ``r::size`` held by each rank -> all ``n`` rows in order, on every rank (CPU)."""
    if size == 1:
        return local
    width = torch.tensor([local.shape[1] if local.numel() else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = torch.zeros(-(-n // size), int(width), device=device)
    if len(local):  # a rank may hold no row at all: a val split smaller than the number of ranks
        pad[:len(local)] = local.to(device)
    parts = [torch.zeros_like(pad) for _ in range(size)]
    dist.all_gather(parts, pad)
    full = torch.zeros(n, int(width))
    for r, p in enumerate(parts):
        full[r::size] = p[:len(range(r, n, size))].cpu()
    return full


def fit(model: TaskModel, opt: torch.optim.Optimizer, train: Split, val: Split, loop: Loop, *,
        device, task: Task | None = None, state: "RunState | None" = None, on_epoch: Callable | None = None,
        progress: bool = True, desc: str = "") -> EpochStats | None:
    """Train ``model`` from where ``state`` left off to ``loop.epochs`` (or ``loop.until``),
    scoring val after every epoch; ``on_epoch(stats)`` (rank 0) writes the epoch's records,
    then ``state`` saves. Returns the last epoch's stats (None if nothing was left to train)."""
    from torch.nn.parallel import DistributedDataParallel

    task = task or Task()
    rank, size = world()
    progress = progress and rank == 0
    n = len(train)
    bs, per_epoch, total, warmup = loop.steps(n, size)
    epoch, step = state.resume(model, opt) if state is not None else (0, 0)
    stop = min(loop.until or loop.epochs, loop.epochs)
    wrapped = model
    if size > 1 and any(p.requires_grad for p in model.parameters()):
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for g in opt.param_groups for p in g["params"]]
    names = list(model.heads)
    with_ntp = bool(model.ntp_weight)
    stats = None
    model.train()
    while epoch < stop:
        order = batch_order(n, loop.seed, epoch)
        # per head: loss sum, correct count; then ntp sum, samples; summed over ranks each step
        sums = torch.zeros(2 * len(names) + 2, dtype=torch.float64, device=device)
        last = sums
        tic = time.perf_counter()
        bar = tqdm(range(per_epoch), desc=f"{desc}epoch {epoch + 1}/{loop.epochs}", unit="step",
                   disable=not progress, dynamic_ncols=True)
        for b in bar:
            rows = order[b * bs:(b + 1) * bs]
            local = rows[rank::size]
            set_lr(opt, step, total, warmup, loop.min_lr_ratio)
            inputs, y = train.batch(local, device)
            logits, ntp = wrapped(inputs, with_ntp=with_ntp)
            per_head = [task.loss(logits[k], y) for k in names]
            loss = sum(x.sum() for x in per_head)
            if ntp is not None:
                loss = loss + model.ntp_weight * ntp * len(local)
            (loss * size / len(rows)).backward()  # DDP averages over ranks: the global batch mean
            if loop.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, loop.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            with torch.no_grad():
                vals = [x.sum() for x in per_head] + [task.correct(logits[k], y).sum() for k in names]
                vals += [ntp * len(local) if ntp is not None else torch.zeros((), device=device),
                         torch.tensor(float(len(local)), device=device)]
                last = all_sum(torch.stack([v.double() for v in vals]))
            sums += last
        bar.close()
        epoch += 1
        k = len(names)
        seen = float(sums[-1])
        train_loss = {name: float(sums[i]) / seen for i, name in enumerate(names)}
        bad = [v for v in train_loss.values() if not math.isfinite(v)]
        if bad:
            raise TrainingError(f"{desc}loss became {bad[0]} in epoch {epoch}; lower the learning rate")
        val_logits, val_ntp = predict(model, val, bs, device, with_ntp=model.ntp_weight is not None,
                                      progress=progress, desc="val")
        stats = EpochStats(
            epoch=epoch, step=step, lr_factor=cosine_lr(step - 1, total, warmup, 1.0, loop.min_lr_ratio),
            train_loss=train_loss, train_correct={name: float(sums[k + i]) / seen for i, name in enumerate(names)},
            train_ntp=float(sums[2 * k]) / seen if with_ntp else None,
            last_loss={name: float(last[i]) / float(last[-1]) for i, name in enumerate(names)},
            val={name: task.metrics(val_logits[name], val.targets) for name in names}, val_ntp=val_ntp,
            val_logits=val_logits, time_s=time.perf_counter() - tic)
        if rank == 0 and on_epoch is not None:
            on_epoch(stats)
        if state is not None:
            state.save(model, opt, epoch, step, {"last_loss": stats.last_loss})
    if wrapped is not model:
        # free DDP's reducer (and the gloo work it holds) now: collected at interpreter exit, after
        # the process group is gone, it can abort the process
        del wrapped
        gc.collect()
    return stats


# -- per-epoch state, resume, metrics ---------------------------------------------------------------


class RunState:
    """One run's state after each epoch, written atomically by rank 0: the heads, the optimizer,
    epoch and step, and ``run_id`` (everything that changes the result: a resume with other
    settings is refused, naming them). A fine-tuned trunk makes it a normal toto checkpoint
    under ``root/checkpoints`` (``toto probe`` and ``forecast`` load it; ``trunk = (model
    config, state fields)``); a frozen one is not copied: ``root/epoch_<e>``.

    ``metrics`` (a metrics.jsonl) loses the records a killed run wrote after its last state;
    ``filter`` picks this run's records when several runs share the file."""

    def __init__(self, root: Path, run_id: dict, *, resume: bool, what: str, metrics: Path | None = None,
                 trunk: tuple | None = None, keep: int = 2, filter: Callable[[dict], bool] | None = None):
        self.root, self.run_id, self.resume_ok, self.what = Path(root), json.loads(json.dumps(run_id)), resume, what
        self.metrics, self.trunk, self.keep, self.filter = metrics, trunk, keep, filter or (lambda r: True)
        self.last_loss: dict = {}

    def latest(self) -> Path | None:
        if self.trunk is not None:
            from ..train.checkpoint import latest_checkpoint

            return latest_checkpoint(self.root)
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = pointer.parent / pointer.read_text().strip()
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; remove "
                                  f"{pointer.parent} to start over")
        return path

    def resume(self, model: TaskModel, opt: torch.optim.Optimizer) -> tuple[int, int]:
        """(epoch, step) to continue from: (0, 0) for a new run. Refuses an existing run
        without ``resume`` and a resume with changed settings."""
        saved = self.latest()
        if saved is None:
            rank, _ = world()
            if rank == 0 and self.metrics is not None and self.metrics.exists():
                self._trim(None)  # records of a run killed before its first saved state
            return 0, 0
        if not self.resume_ok:
            raise ConfigError(f"{self.root} already holds {self.what} ({saved.name}); pass --resume to continue it "
                              f"or choose another --out")
        state = json.loads((saved / "state.json").read_text())
        refuse_changed(state.get("run") or {}, self.run_id, f"--resume: {self.root}")
        self._load(saved, model, opt)
        epoch, step = int(state["epoch"]), int(state["step"])
        self.last_loss = state.get("last_loss", {})
        if world()[0] == 0 and self.metrics is not None:
            self._trim(epoch)
        print(f"resuming {self.root} after epoch {epoch} (step {step})")
        return epoch, step

    def _trim(self, epoch: int | None) -> None:
        trim_metrics(self.metrics, lambda r: not self.filter(r) or (epoch is not None and r["epoch"] <= epoch))

    def _load(self, path: Path, model: TaskModel, opt) -> None:
        from safetensors.torch import load_file

        from ..train.checkpoint import load_weights, optimizer_from_tensors, read_checkpoint

        heads = [f"{name}.safetensors" for name in model.heads]
        try:
            if self.trunk is not None:
                _, _, tensors = read_checkpoint(path)
                verify_checksums(path, [*heads, "optimizer.safetensors"])
                load_weights(model.trunk, tensors, str(path))
            for name, head in model.heads.items():
                device = next(iter(head.state_dict().values()), torch.zeros(())).device
                head.load_state_dict(load_file(str(path / f"{name}.safetensors"), device=str(device)))
            meta = json.loads((path / "optimizer.json").read_text())
            opt.load_state_dict(optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), meta))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot restore the {self.what} state ({e})") from None

    def save(self, model: TaskModel, opt, epoch: int, step: int, extra: dict) -> None:
        from ..train.checkpoint import optimizer_to_tensors, save_checkpoint

        rank, _ = world()
        if rank == 0:
            state = {"epoch": epoch, "step": step, "run": self.run_id, **extra,
                     "batch_order": "numpy default_rng([seed, epoch]).permutation(n_train)"}
            if self.trunk is not None:
                mcfg, fields = self.trunk
                save_checkpoint(self.root, step, model.trunk, mcfg, {**fields, **state}, opt.state_dict(),
                                keep=self.keep, extra_tensors=model.head_state())
            else:
                from safetensors.torch import save_file

                root = self.root
                name = f"epoch_{epoch:04d}"
                tensors, meta = optimizer_to_tensors(opt.state_dict())
                with atomic_dir(root / name) as tmp:
                    for head, head_tensors in model.head_state().items():
                        save_file(head_tensors, str(tmp / f"{head}.safetensors"))
                    save_file(tensors, str(tmp / "optimizer.safetensors"))
                    atomic_write_json(tmp / "optimizer.json", meta)
                    atomic_write_json(tmp / "state.json", {**state})
                atomic_write_bytes(root / "latest", name.encode())
                for old in root.glob("epoch_*"):
                    if old.name != name:
                        shutil.rmtree(old)
        if dist.is_initialized():
            dist.barrier()


def rank0_first(fn: Callable):
    """Rank 0 runs ``fn`` (e.g. fills a cache), then the other ranks run it and read what rank 0
    wrote: one writer per cache."""
    rank, _ = world()
    out = fn() if rank == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return fn() if rank != 0 else out


# -- a whole task job: load, read, train, score -----------------------------------------------------


def make_optimizer(model: TaskModel, lr: float, head_lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    """AdamW over what trains: trunk groups at ``lr`` (muP's per-group scale kept), head groups at
    ``head_lr``; decay on matrices only."""
    groups = []
    if model.trunk is not None and model.train_trunk:
        groups += param_groups(model.trunk, weight_decay, model.trunk.width_mult, base_lr=lr)
    return adamw(groups + param_groups(model.heads, weight_decay, base_lr=head_lr), device, head_lr)


@dataclass
class Finished:
    model: TaskModel
    stats: EpochStats | None  # the last epoch trained now (None: the run had finished before)
    state: RunState

    @property
    def last_loss(self) -> dict[str, float]:
        """Per head, the loss of the run's last step."""
        return self.stats.last_loss if self.stats is not None else self.state.last_loss


@dataclass
class TaskRun:
    """What every task job shares: which checkpoint and tokenizer, frozen or fine-tuned, the
    random-init baseline, the loop and the optimizer, where results go. ``run(task)`` is the
    whole job; commands with more to report call its steps (``load``, ``read``, ``train``)."""

    checkpoint: str
    tokenizer: str
    out: Path
    loop: Loop
    finetune: bool = False  # train the trunk with the task's loss + ntp_weight x next-token NLL
    lr: float = 1e-4  # trunk peak lr when fine-tuning; 0 keeps it frozen
    head_lr: float = 1e-3
    weight_decay: float = 0.05
    ntp_weight: float = 1.0
    random_init: bool = False  # also run the task on the random-init baseline
    device: str = "auto"
    dtype: str = "auto"  # auto (bf16 autocast on GPU) | bf16 | fp32
    cache: str | None = None  # token cache folder; default OUT/tokens
    resume: bool = False
    keep: int = 2  # fine-tuned checkpoints kept
    progress: bool = True
    precompute: int = 0  # frozen runs: > 0 computes each model's features once, in memory (forwards of this
    # many sequences), and trains the heads on them: one trunk pass in all instead of one per epoch

    def run(self, task: Task) -> dict[str, Finished]:
        bb = self.load(task.spec)
        return self.train(task, bb, self.read(task, bb))

    def load(self, spec) -> Backbone:
        from ..train.distributed import init_distributed

        _, self.torch_device = init_distributed(self.device)
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        return load_backbone(self.checkpoint, self.tokenizer, spec, self.torch_device)

    def read(self, task: Task, bb: Backbone) -> dict[str, Split]:
        """The task's splits, its token cache filled by rank 0 first."""
        cache = Path(self.cache) if self.cache else self.out / "tokens"
        return rank0_first(lambda: task.read(bb.tokenizer, bb.layout, {"tokenizer": bb.tok_id}, cache,
                                             self.progress and world()[0] == 0))

    def train(self, task: Task, bb: Backbone, splits: dict[str, Split], settings: dict | None = None,
              state_dir: Callable[[str], Path] | None = None, on_epoch: Callable | None = None) -> dict[str, Finished]:
        """Each model (trained, then random init) with fresh heads: fit, per-epoch state under
        ``state_dir(name)`` (default OUT/<name>; a fine-tuned trunk is a checkpoint there),
        ``on_epoch(name, stats)`` on rank 0 (default: one generic metrics.jsonl record).
        ``settings``: what else a resume must match (the command's options)."""
        metrics = self.out / "metrics.jsonl"
        fields = {"vocab": bb.layout.to_dict(), "init_from": str(bb.path),  # as the trainer records a source
                  **{k: bb.state[k] for k in ("grid", "frames_per_sequence", "tokenizer") if k in bb.state}}
        done = {}
        for name, (trunk, ident) in bb.models(self.random_init).items():
            heads = task.heads(trunk.cfg.dim, trunk.cfg.n_heads)
            model = TaskModel(heads, trunk, train_trunk=self.finetune and self.lr > 0,
                              ntp_weight=self.ntp_weight if self.finetune else None, pad=bb.layout.pad,
                              dtype=self.dtype).to(self.torch_device)
            data = splits
            if self.precompute and not self.finetune:
                data = {s: model.precompute(x, self.precompute, self.torch_device, self.progress and world()[0] == 0,
                                            f"{name} {s} ") for s, x in splits.items()}
                model.trunk = None  # the heads read the precomputed features from now on
            opt = make_optimizer(model, self.lr, self.head_lr, self.weight_decay, self.torch_device)
            run_id = {"model": ident, "tokenizer": bb.tok_id, "task": task.identity(), **(settings or {})}
            state = RunState(state_dir(name) if state_dir else self.out / name, run_id, resume=self.resume,
                             what=f"a {'fine-tuning' if self.finetune else 'frozen'} run", metrics=metrics,
                             trunk=(bb.cfg, fields) if self.finetune else None, keep=self.keep,
                             filter=lambda r, name=name: r.get("model", name) == name)

            def log(s, name=name):
                if on_epoch is not None:
                    return on_epoch(name, s)
                from ..ioutil import append_jsonl

                append_jsonl(metrics, {"model": name, "epoch": s.epoch, "step": s.step, "time_s": s.time_s,
                                       "lr": s.lr_factor * self.lr, "head_lr": s.lr_factor * self.head_lr,
                                       "train_loss": s.train_loss, "train_ntp": s.train_ntp, "val": s.val,
                                       "val_ntp": s.val_ntp})

            stats = fit(model, opt, data["train"], data["val"], self.loop, device=self.torch_device, task=task,
                        state=state, on_epoch=log, progress=self.progress, desc=f"{name} ")
            done[name] = Finished(model, stats, state)
        return done
