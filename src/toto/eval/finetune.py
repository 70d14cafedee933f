"""Fine-tuning a pre-trained model with an attentive probe: the paper's ImageNet recipe,
cross-entropy on the probe plus the next-token loss of the whole model.

    batch: (B, L) ids  [start] + codes + [end]        (L = 2 + frames x h x w)
      -> inputs (B, L-1), next-token targets (B, L-1)  (toto.train.trainer.shift_targets)
      -> one pass of the unfrozen Toto:
           residual stream at layer ``layer``, code positions only: (B, L-2, D) -> Probe -> (B, C)
           final logits (B, L-1, V) -> next-token NLL, exactly the pre-training loss
      loss = CE(probe logits, label) + ntp_weight * NTP

Why the NTP term: it keeps the trunk close to what pre-training learned while the probe's
gradient reshapes it for the labels; ``ntp_weight=0`` is plain fine-tuning of the trunk (then
blocks above ``layer`` and the output head get no gradient and are not even run).

The probe is ``toto.eval.probe.Probe`` with attentive pooling, fed the same features
``toto probe`` extracts (layer ``l`` = output of block ``l``, no final norm, code positions).
Token sequences are encoded once per split and cached (``tokenize_splits``); training is
AdamW (trunk and probe with their own learning rates, decay on matrices only), linear warm-up
+ cosine per step, gradient clipping, bf16 autocast on GPU. A checkpoint after every epoch holds
the trunk (a normal toto checkpoint: ``toto probe``/``forecast`` load it), the probe, the
optimizer and the epoch; batch order is a pure function of (seed, epoch) and nothing else draws
random numbers after initialisation, so ``resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from ..ioutil import append_jsonl, atomic_file, atomic_write_bytes, atomic_write_json, read_jsonl, verify_checksums
from ..vocab import token_dtype
from .features import LabelledDataset, SequenceSpec, file_identity, iter_codes, open_chunk_cache
from .probe import Probe, ProbeConfig, cosine_lr, epoch_steps, topk_accuracy

TOKEN_CACHE_VERSION = 1


@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters; the defaults suit a small pre-trained model."""

    layer: int | None = None  # probed layer; None: the middle one, n_layers // 2
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # trunk peak lr (small: the trunk is pre-trained); 0 freezes the trunk
    probe_lr: float = ProbeConfig.lr  # probe peak lr (a fresh head learns fast)
    ntp_weight: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    heads: int = 0  # attentive-probe heads; 0: the model's head count
    norm: str = "batchnorm"  # normalisation of the pooled vector (see toto.eval.probe)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 0

    def validate(self) -> "FinetuneConfig":
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"finetune epochs and batch size must be >= 1, got epochs={self.epochs}, "
                              f"batch_size={self.batch_size}")
        if not self.probe_lr > 0:
            raise ConfigError(f"finetune probe lr must be > 0, got {self.probe_lr}")
        for name in ("lr", "ntp_weight", "weight_decay", "warmup_epochs", "grad_clip", "heads"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"finetune {name} must be a finite number >= 0, got {v}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"finetune layer must be >= 0, got {self.layer}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"finetune min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.norm not in ("batchnorm", "layernorm"):
            raise ConfigError(f"finetune norm must be batchnorm or layernorm, got {self.norm!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"finetune dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# -- token sequences, encoded once per split and cached ---------------------------------------

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
    from safetensors.numpy import load_file, save_file

    cache, manifest = open_chunk_cache(cache_root, {**identity, "version": TOKEN_CACHE_VERSION,
                                                    "sequence": spec.to_dict(), "vocab": layout.to_dict(),
                                                    "chunk_size": chunk_size}, ds)
    mpath = cache / "manifest.json"
    out = {}
    for split, samples in ds.splits.items():
        state = manifest["splits"][split]
        n_chunks = -(-len(samples) // chunk_size)
        todo = [c for c in range(n_chunks) if str(c) not in state["chunks"]]
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
            name = f"{split}_{c:05d}.safetensors"
            if seqs:
                with atomic_file(cache / name) as tmp:
                    save_file({"tokens": np.stack(seqs), "labels": np.asarray(labels, np.int64)}, str(tmp))
            state["chunks"][str(c)] = {"file": name, "n": len(seqs)}
            atomic_write_json(mpath, manifest)
        bar.close()
        parts = [load_file(str(cache / state["chunks"][str(c)]["file"]))
                 for c in range(n_chunks) if state["chunks"][str(c)]["n"]]
        length = 2 + (spec.frames if spec.kind == "video" else 1) * tokenizer.grid[0] * tokenizer.grid[1]
        tokens = (np.concatenate([p["tokens"] for p in parts]) if parts
                  else np.zeros((0, length), token_dtype(layout.vocab_size)))
        labels = np.concatenate([p["labels"] for p in parts]) if parts else np.zeros(0, np.int64)
        out[split] = SplitTokens(tokens, labels, list(state["skipped"]))
    return out, cache


# -- one pass, two losses ----------------------------------------------------------------------

def layer_and_ntp(model, inputs: torch.Tensor, targets: torch.Tensor, layer: int, with_ntp: bool):
    """One forward pass: the residual stream at ``layer`` ``(B, T, D)`` and, with ``with_ntp``,
    the mean next-token NLL (as ``Toto.forward``); without it the pass stops at ``layer``."""
    if not with_ntp:
        return model(inputs, layers=[layer], stop_at=layer)[layer], None
    (_, ntp), hidden = model(inputs, targets, layers=[layer])
    return hidden[layer], ntp


def loss_terms(model, probe: Probe, batch: torch.Tensor, labels: torch.Tensor, layer: int,
               ntp_weight: float, pad: int):
    """``batch: (B, L)`` full sequences -> (loss, ce, ntp or None, probe logits ``(B, C)``)
    with ``loss = ce + ntp_weight * ntp``."""
    from ..train.trainer import shift_targets

    inputs, targets = shift_targets(batch, pad)
    hidden, ntp = layer_and_ntp(model, inputs, targets, layer, ntp_weight > 0)
    logits = probe(hidden[:, 1:]).float()  # code positions only, as toto probe's features
    ce = F.cross_entropy(logits, labels)
    return (ce if ntp is None else ce + ntp_weight * ntp), ce, ntp, logits


def _batch(split: SplitTokens, idx, device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(split.tokens[idx].astype(np.int64)).to(device)  # (B, L)
    return tokens, torch.from_numpy(split.labels[idx]).to(device)


@torch.no_grad()
def evaluate(model, probe: Probe, split: SplitTokens, layer: int, batch_size: int, device, dtype: str,
             pad: int, progress: bool = False) -> dict:
    """Val top-1/top-5, probe cross-entropy and next-token NLL (token-weighted) of a split, and
    the per-sample ``logits (N, C)`` (not JSON: saved apart as val_predictions.npz)."""
    from ..train.trainer import autocast_for, shift_targets

    was_training = model.training, probe.training
    model.eval()
    probe.eval()
    logits, ntp_sum, ntp_n = [], 0.0, 0
    starts = range(0, len(split.labels), batch_size)
    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False, dynamic_ncols=True):
        batch, _ = _batch(split, np.arange(s, min(s + batch_size, len(split.labels))), device)
        inputs, targets = shift_targets(batch, pad)
        with autocast_for(device, dtype):
            hidden, ntp = layer_and_ntp(model, inputs, targets, layer, True)
            logits.append(probe(hidden[:, 1:]).float().cpu())
        n = int((targets != -1).sum())
        ntp_sum, ntp_n = ntp_sum + float(ntp) * n, ntp_n + n
    model.train(was_training[0])
    probe.train(was_training[1])
    logits = torch.cat(logits)
    y = torch.from_numpy(split.labels)
    return {"top1": topk_accuracy(logits, y, 1),
            "top5": topk_accuracy(logits, y, 5) if logits.shape[1] > 5 else None,
            "ce": float(F.cross_entropy(logits, y)), "ntp": ntp_sum / max(ntp_n, 1), "logits": logits}


def save_predictions(path: Path, logits: torch.Tensor, split: SplitTokens, ds, name: str) -> None:
    """``logits (N, C)``, ``labels (N,)``, the samples' ``paths`` (the split's readable files, in
    order) and the ``classes`` (index -> label text) of the latest evaluation, for task metrics
    beyond top-k (e.g. toto.eval.cater)."""
    bad = {x["path"] for x in split.skipped}
    paths = [str(s.path) for s in ds.splits[name] if str(s.path) not in bad]
    if len(paths) != len(split.labels):
        raise DataError(f"{path}: {len(paths)} readable samples but {len(split.labels)} predictions")
    write_predictions(path, logits, split.labels, paths, ds.classes)


def write_predictions(path: Path, logits: torch.Tensor, labels, paths: list[str], classes: list[str]) -> None:
    """One ``.npz`` (atomically): logits, labels, paths, classes."""
    import io

    buf = io.BytesIO()
    np.savez(buf, logits=logits.numpy(), labels=np.asarray(labels), paths=np.array(paths), classes=np.array(classes))
    atomic_write_bytes(path, buf.getvalue())


# -- the whole job: checkpoint + tokenizer + dataset -> fine-tuned checkpoint and results -------

@dataclass
class FinetuneJob:
    checkpoint: str
    tokenizer: str
    data: str
    out: Path
    cfg: FinetuneConfig | None = None
    cache: str | None = None  # token cache folder; default OUT/tokens
    device: str = "auto"
    frames: int = 16
    stride: int = 4
    clip: str = "center"  # which window of a longer video: center | first
    max_per_class: int | None = None
    resume: bool = False
    until: int | None = None  # stop after this epoch (with a checkpoint); the schedule keeps `epochs`
    keep: int = 2  # checkpoints kept under OUT/checkpoints
    progress: bool = True

    def run(self) -> dict:
        from ..device import resolve_device
        from ..tokenizers.base import get_tokenizer
        from ..train.checkpoint import latest_checkpoint, load_model, resolve_checkpoint
        from ..train.trainer import autocast_for
        from .features import check_compatible, scan_dataset

        cfg = (self.cfg or FinetuneConfig()).validate()
        if self.until is not None and self.until < 1:
            raise ConfigError(f"finetune: --until must be >= 1, got {self.until}")
        self.out = Path(self.out)
        device = resolve_device(self.device)
        tok = get_tokenizer(self.tokenizer, device=str(device))
        ds = scan_dataset(self.data, self.max_per_class)
        if len(ds.classes) < 2:
            raise DataError(f"{self.data}: fine-tuning a classifier needs at least 2 classes, found "
                            f"{len(ds.classes)} ({ds.classes})")
        spec = SequenceSpec(ds.kind, self.frames, self.stride, self.clip)
        src = resolve_checkpoint(self.checkpoint)
        model, mcfg, src_state = load_model(src, device)
        layout = check_compatible(mcfg.model, src_state, tok, spec, str(src))
        n_layers = mcfg.model.n_layers
        layer = n_layers // 2 if cfg.layer is None else cfg.layer
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"--layer {layer} out of range: this model has layers 0..{n_layers}")
        cfg = replace(cfg, layer=layer)
        self.out.mkdir(parents=True, exist_ok=True)

        tok_id = {**tok.identity(), "file": file_identity(self.tokenizer)}
        data, cache = tokenize_splits(ds, tok, layout, spec, {"tokenizer": tok_id},
                                      Path(self.cache) if self.cache else self.out / "tokens",
                                      progress=self.progress)
        n_train, n_val = len(data["train"].labels), len(data["val"].labels)
        skipped = {s: data[s].skipped for s in data}
        if any(skipped.values()):
            first = (skipped["train"] + skipped["val"])[0]
            print(f"skipped {sum(map(len, skipped.values()))} unreadable file(s), e.g. {first['reason']}")
        if n_train < 2 or n_val < 1:
            raise DataError(f"{self.data}: {n_train} readable train and {n_val} val sample(s); fine-tuning "
                            f"needs at least 2 train and 1 val")

        # what a resumed run must match (everything that changes the result)
        run_id = {"checkpoint": str(src), "checkpoint_step": src_state.get("step"), "tokenizer": tok_id,
                  "data": str(Path(self.data).resolve()), "classes": ds.classes, "sequence": spec.to_dict(),
                  "max_per_class": self.max_per_class, "finetune": cfg.to_dict()}

        torch.manual_seed(cfg.seed)
        probe = Probe(mcfg.model.dim, len(ds.classes), "attentive", cfg.heads or mcfg.model.n_heads,
                      cfg.norm).to(device)
        if cfg.lr == 0:
            model.requires_grad_(False)  # a frozen trunk: the probe trains on live features
        model.train()
        probe.train()
        opt = self._optimizer(model, probe, cfg, device)

        epoch, step = 0, 0
        last = latest_checkpoint(self.out)
        if last is not None and not self.resume:
            raise ConfigError(f"{self.out} already holds a fine-tuning run ({last.name}); pass --resume to "
                              f"continue it or choose another --out")
        if last is not None:
            epoch, step = self._load(last, model, probe, opt, run_id)
            kept = [r for r in read_jsonl(self.out / "metrics.jsonl") if r["epoch"] <= epoch]
            atomic_write_bytes(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
            print(f"resuming {self.out} after epoch {epoch} (step {step})")
        elif (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()  # records of a run killed before its first checkpoint

        report = {"checkpoint": str(src), "step": src_state.get("step"), "tokenizer": str(self.tokenizer),
                  "data": str(self.data), "kind": ds.kind, "classes": ds.classes, "n_classes": len(ds.classes),
                  "chance": 1 / len(ds.classes), "layer": layer, "n_layers": n_layers,
                  "finetune": cfg.to_dict(), "sequence": spec.to_dict(), "grid": list(tok.grid),
                  "n_train": n_train, "n_val": n_val, "token_cache": str(cache),
                  "skipped": {s: [x["path"] for x in v] for s, v in skipped.items()},
                  "skipped_class_folders": ds.skipped_classes}
        bs = min(cfg.batch_size, n_train)
        per_epoch = epoch_steps(n_train, bs)
        total, warmup = per_epoch * cfg.epochs, round(cfg.warmup_epochs * per_epoch)
        stop = min(self.until or cfg.epochs, cfg.epochs)
        params = [p for g in opt.param_groups for p in g["params"]]
        while epoch < stop:
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(n_train)
            sums = {"loss": 0.0, "ce": 0.0, "ntp": 0.0, "correct": 0, "seen": 0}
            tic = time.perf_counter()
            bar = tqdm(range(per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       disable=not self.progress, dynamic_ncols=True)
            for b in bar:
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(step, total, warmup, g["base_lr"], cfg.min_lr_ratio) * g["lr_scale"]
                batch, y = _batch(data["train"], perm[b * bs:(b + 1) * bs], device)
                with autocast_for(device, cfg.dtype):
                    loss, ce, ntp, logits = loss_terms(model, probe, batch, y, layer, cfg.ntp_weight, layout.pad)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                step += 1
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise TrainingError(f"finetune loss became {lv} in epoch {epoch + 1}; lower --lr / --probe-lr")
                sums["loss"] += lv
                sums["ce"] += float(ce.detach())
                sums["ntp"] += float(ntp.detach()) if ntp is not None else 0.0
                sums["correct"] += int((logits.argmax(1) == y).sum())
                sums["seen"] += len(y)
                bar.set_postfix(loss=f"{lv:.3f}")
            bar.close()
            epoch += 1
            val = evaluate(model, probe, data["val"], layer, bs, device, cfg.dtype, layout.pad, self.progress)
            record = {"epoch": epoch, "step": step,
                      "lr": cosine_lr(step - 1, total, warmup, cfg.lr, cfg.min_lr_ratio),
                      "probe_lr": cosine_lr(step - 1, total, warmup, cfg.probe_lr, cfg.min_lr_ratio),
                      "train_loss": sums["loss"] / per_epoch, "train_ce": sums["ce"] / per_epoch,
                      "train_ntp": sums["ntp"] / per_epoch if cfg.ntp_weight > 0 else None,
                      "train_top1": sums["correct"] / sums["seen"],
                      "val_top1": val["top1"], "val_top5": val["top5"], "val_ce": val["ce"],
                      "val_ntp": val["ntp"], "time_s": time.perf_counter() - tic}
            append_jsonl(self.out / "metrics.jsonl", record)
            if self.progress:
                tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}  val top-1 "
                           f"{100 * val['top1']:.1f}%  val CE {val['ce']:.4f}  val NTP {val['ntp']:.4f}")
            self._save(model, probe, opt, mcfg, src_state, layout, run_id, epoch, step)
            save_predictions(self.out / "val_predictions.npz", val["logits"], data["val"], ds, "val")
            self._write_results(report)
        return self._write_results(report, plot=True)

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _optimizer(model, probe, cfg: FinetuneConfig, device) -> torch.optim.AdamW:
        """Trunk groups at ``lr`` (muP's per-group scale kept), probe groups at ``probe_lr``."""
        from ..train.trainer import param_groups

        groups = [{**g, "base_lr": cfg.lr} for g in param_groups(model, cfg.weight_decay, model.width_mult)]
        groups += [{**g, "base_lr": cfg.probe_lr} for g in param_groups(probe, cfg.weight_decay)]
        kw = {"fused": True} if device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=cfg.probe_lr, **kw)

    def _save(self, model, probe, opt, mcfg, src_state, layout, run_id, epoch, step) -> Path:
        from ..train.checkpoint import save_checkpoint

        osd = opt.state_dict()
        state = {"epoch": epoch, "vocab": layout.to_dict(), "finetune_run": run_id,
                 "init_from": run_id["checkpoint"],  # as the trainer records it: the source checkpoint
                 "batch_order": "numpy default_rng([seed, epoch]).permutation(n_train)"}
        for key in ("grid", "frames_per_sequence", "tokenizer"):
            if key in src_state:
                state[key] = src_state[key]
        return save_checkpoint(self.out, step, model, mcfg, state, osd, keep=self.keep,
                               extra_tensors={"probe": probe.state_dict()})

    @staticmethod
    def _load(path: Path, model, probe, opt, run_id: dict) -> tuple[int, int]:
        from safetensors.torch import load_file

        from ..train.checkpoint import load_weights, optimizer_from_tensors, read_checkpoint

        _, state, tensors = read_checkpoint(path)
        saved = state.get("finetune_run")
        if saved is None:
            raise CheckpointError(f"{path}: not a fine-tuning checkpoint (no finetune_run in state.json)")
        now = json.loads(json.dumps(run_id))  # as it reads back from JSON
        if saved != now:
            def flat(d: dict) -> dict:
                return {**{k: v for k, v in d.items() if k != "finetune"},
                        **{f"finetune.{k}": v for k, v in d.get("finetune", {}).items()}}

            a, b = flat(saved), flat(now)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(f"--resume: {path.parent.parent} was started with other settings ({', '.join(diff)} "
                              f"differ); rerun with the original ones or choose another --out")
        verify_checksums(path, ["probe.safetensors", "optimizer.safetensors"])
        try:
            load_weights(model, tensors, str(path))
            probe.load_state_dict(load_file(str(path / "probe.safetensors"), device=str(probe.head.weight.device)))
            meta = json.loads((path / "optimizer.json").read_text())
            opt.load_state_dict(optimizer_from_tensors(load_file(str(path / "optimizer.safetensors")), meta))
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot restore the fine-tuning state ({e})") from None
        return int(state["epoch"]), int(state["step"])

    def _write_results(self, report: dict, plot: bool = False) -> dict:
        from ..train.checkpoint import latest_checkpoint

        epochs = read_jsonl(self.out / "metrics.jsonl")
        report = {**report, "epochs": epochs}
        if epochs:
            best = max(epochs, key=lambda r: (r["val_top1"], -r["epoch"]))
            report.update(first_epoch={"epoch": 1, "val_top1": epochs[0]["val_top1"]},
                          final={"epoch": epochs[-1]["epoch"], "val_top1": epochs[-1]["val_top1"],
                                 "val_top5": epochs[-1]["val_top5"], "val_ce": epochs[-1]["val_ce"],
                                 "val_ntp": epochs[-1]["val_ntp"]},
                          best={"epoch": best["epoch"], "val_top1": best["val_top1"]},
                          finetuned_checkpoint=str(latest_checkpoint(self.out)))
        atomic_write_json(self.out / "results.json", report)
        if plot and epochs:
            plot_finetune(report, self.out / "finetune.png")
        return report

    @staticmethod
    def table(report: dict) -> str:
        head = (f"{'epoch':>5}  {'train loss':>10}  {'train CE':>8}  {'train NTP':>9}  {'val CE':>7}  "
                f"{'val NTP':>7}  {'val top-1':>9}" + (f"  {'val top-5':>9}" if report["n_classes"] > 5 else ""))
        lines = [head]
        for r in report["epochs"]:
            ntp = f"{r['train_ntp']:9.4f}" if r["train_ntp"] is not None else f"{'-':>9}"
            row = (f"{r['epoch']:>5}  {r['train_loss']:10.4f}  {r['train_ce']:8.4f}  {ntp}  {r['val_ce']:7.4f}  "
                   f"{r['val_ntp']:7.4f}  {100 * r['val_top1']:8.1f}%")
            if r["val_top5"] is not None:
                row += f"  {100 * r['val_top5']:8.1f}%"
            lines.append(row)
        if report.get("best"):
            lines.append(f"layer {report['layer']} of {report['n_layers']}, ntp weight "
                         f"{report['finetune']['ntp_weight']}: val top-1 {100 * report['first_epoch']['val_top1']:.1f}% "
                         f"after epoch 1, {100 * report['final']['val_top1']:.1f}% after epoch "
                         f"{report['final']['epoch']} (best {100 * report['best']['val_top1']:.1f}% at epoch "
                         f"{report['best']['epoch']}; chance {100 * report['chance']:.1f}%)")
        return "\n".join(lines)


def plot_finetune(report: dict, path) -> None:
    """Val (and train) top-1 and the loss terms against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = report["epochs"]
    ep = [r["epoch"] for r in rs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [100 * r["val_top1"] for r in rs], "o-", label="val top-1")
    if rs[0]["val_top5"] is not None:
        a1.plot(ep, [100 * r["val_top5"] for r in rs], "o--", label="val top-5")
    a1.plot(ep, [100 * r["train_top1"] for r in rs], ".:", label="train top-1 (during the epoch)")
    a1.axhline(100 * report["chance"], color="gray", lw=0.8, ls=":", label="chance")
    a1.set_ylim(0, 100)
    a1.set_xlabel("epoch")
    a1.set_ylabel("accuracy (%)")
    a1.set_title(f"probe on layer {report['layer']} of {report['n_layers']}")
    curves = [("train_ce", "train CE", "tab:blue", "-"), ("val_ce", "val CE", "tab:blue", "--"),
              ("train_ntp", "train NTP", "tab:orange", "-"), ("val_ntp", "val NTP", "tab:orange", "--")]
    for key, label, color, style in curves:
        ys = [r[key] for r in rs]
        if all(y is not None for y in ys):
            a2.plot(ep, ys, style, marker="o", color=color, label=label)
    a2.set_xlabel("epoch")
    a2.set_ylabel("loss (nats)")
    a2.set_title(f"loss = CE + {report['finetune']['ntp_weight']} x NTP")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
