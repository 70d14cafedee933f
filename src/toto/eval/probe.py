"""Probing frozen features: attentive pooling (the paper's probe) and average pooling.

Both heads see one layer's token features ``(B, T, D)`` and share everything after pooling:

    tokens -> LayerNorm (no affine, per token) -> pool -> BatchNorm (no affine) -> Linear

- The per-token LayerNorm evens out the residual stream's scale, which grows with depth and
  differs by orders of magnitude between layers; without it one learning rate cannot suit
  every layer.
- The pooled vector is normalised by BatchNorm without affine parameters (as in MAE's linear
  probe): the classifier sees standardised features whatever the layer. ``norm="layernorm"``
  swaps in a LayerNorm without affine parameters.
- Attentive pooling: one learned query token cross-attends to the tokens with learned key and
  value projections, multi-head, ``softmax(q k^T / sqrt(d_head)) v`` per head, heads
  concatenated. Average pooling: the mean over tokens.

Training is AdamW with a linear warm-up and cosine decay per optimizer step, full batches of
features held in memory; given the same seed, features and settings it is deterministic.
``ProbeJob(online=True)`` trains the same probes without a feature cache (probe_online.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..ioutil import atomic_file

POOLINGS = ("attentive", "average")


@dataclass
class ProbeConfig:
    """Probe hyper-parameters; defaults suit a few thousand to a few hundred thousand samples."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0  # linear warm-up length, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    heads: int = 0  # attention heads of the attentive pooler; 0: the model's own head count
    norm: str = "batchnorm"  # normalisation of the pooled vector: batchnorm | layernorm
    seed: int = 0

    def validate(self) -> "ProbeConfig":
        for name in ("epochs", "batch_size", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"probe {name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.heads < 0:
            raise ConfigError("probe weight_decay, warmup_epochs and heads must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"probe min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.norm not in ("batchnorm", "layernorm"):
            raise ConfigError(f"probe norm must be batchnorm or layernorm, got {self.norm!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class AttentivePool(nn.Module):
    """``x: (B, T, D)`` -> ``(B, D)``: a learned query attends over the tokens, per head."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads:
            raise ConfigError(f"attentive probe: feature width {dim} is not divisible by {n_heads} heads")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H, Dh = self.n_heads, self.head_dim
        k = self.k(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        v = self.v(x).view(B, T, H, Dh).transpose(1, 2)
        q = self.query.view(1, H, 1, Dh).expand(B, H, 1, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, Dh)
        return y.reshape(B, D)

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, T)``: where each head looks (for inspection and plots)."""
        B, T, D = x.shape
        k = self.k(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.query.view(1, self.n_heads, 1, self.head_dim)
        return torch.softmax((q * k).sum(-1) / math.sqrt(self.head_dim), dim=-1)


class AveragePool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class Probe(nn.Module):
    """Token features ``(B, T, D)`` -> class logits ``(B, n_classes)``."""

    def __init__(self, dim: int, n_classes: int, pooling: str, heads: int, norm: str = "batchnorm"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.token_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.pool = AttentivePool(dim, heads) if pooling == "attentive" else AveragePool()
        self.norm = (nn.BatchNorm1d(dim, affine=False) if norm == "batchnorm"
                     else nn.LayerNorm(dim, elementwise_affine=False))
        self.head = nn.Linear(dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small start, as MAE's probe head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pool(self.token_norm(x.float()))))


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_ratio
    return floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * progress))


def epoch_steps(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` samples; a trailing batch of one is dropped, since
    BatchNorm cannot normalise a single sample."""
    return max(1, n // batch_size if n % batch_size < 2 else n // batch_size + 1)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)`` bool: is the row's label among its ``k`` largest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits."""
    return float(topk_hits(logits, labels, k).float().mean())


@dataclass
class ProbeResult:
    top1: float
    top5: float | None
    train_top1: float
    final_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict(probe: Probe, feats: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    probe.eval()
    out = [probe(feats[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(feats), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, probe.head.out_features)


def make_probe(dim: int, n_classes: int, pooling: str, cfg: ProbeConfig, default_heads: int,
               device: torch.device) -> tuple[Probe, torch.optim.AdamW]:
    """A probe and its AdamW (decay on matrices only), drawn right after seeding with
    ``cfg.seed``: every probe starts the same whatever ran before it, cached or online."""
    torch.manual_seed(cfg.seed)
    probe = Probe(dim, n_classes, pooling, cfg.heads or default_heads, cfg.norm).to(device)
    decay = [p for p in probe.parameters() if p.dim() >= 2]
    rest = [p for p in probe.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    return probe, opt


def probe_schedule(n: int, cfg: ProbeConfig) -> tuple[int, int, int, int]:
    """(batch size, steps per epoch, total steps, warm-up steps) for ``n`` train samples."""
    bs = min(cfg.batch_size, n)
    steps_per_epoch = epoch_steps(n, bs)
    return bs, steps_per_epoch, steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)


def probe_step(probe: Probe, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               lr: float) -> torch.Tensor:
    """One AdamW step on a batch ``x: (B, T, D)``, ``y: (B,)``; returns the loss before it."""
    for g in opt.param_groups:
        g["lr"] = lr
    loss = F.cross_entropy(probe(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                n_classes: int, pooling: str, cfg: ProbeConfig, default_heads: int,
                device: str | torch.device = "cpu") -> tuple[ProbeResult, Probe]:
    """Fit one probe on ``train_x: (N, T, D)`` (any float dtype, kept on the CPU) and score it on
    the validation split. Deterministic for a given ``cfg.seed``."""
    cfg.validate()
    device = torch.device(device)
    if len(train_x) == 0 or len(val_x) == 0:
        raise ConfigError("probe: the train and val splits both need at least one sample")
    gen = torch.Generator().manual_seed(cfg.seed)  # the batch order; see toto.eval.probe_online
    probe, opt = make_probe(train_x.shape[-1], n_classes, pooling, cfg, default_heads, device)
    n = len(train_x)
    bs, steps_per_epoch, total, warmup = probe_schedule(n, cfg)
    step, loss = 0, torch.tensor(float("nan"))
    probe.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            lr = cosine_lr(step, total, warmup, cfg.lr, cfg.min_lr_ratio)
            loss = probe_step(probe, opt, train_x[idx].to(device), train_y[idx].to(device), lr)
            step += 1
    val_logits = predict(probe, val_x, cfg.batch_size, device)
    train_logits = predict(probe, train_x, cfg.batch_size, device)
    result = ProbeResult(
        top1=topk_accuracy(val_logits, val_y, 1),
        top5=topk_accuracy(val_logits, val_y, 5) if n_classes > 5 else None,
        train_top1=topk_accuracy(train_logits, train_y, 1),
        final_loss=float(loss.detach()),
    )
    return result, probe


def best_layer(results: dict[int, dict[str, dict]], pooling: str) -> tuple[int, float]:
    """(layer, top-1) with the highest validation top-1 for ``pooling`` (shallowest on ties)."""
    scored = [(r[pooling]["top1"], -layer, layer) for layer, r in results.items() if pooling in r]
    if not scored:
        raise ValueError(f"no results for pooling {pooling!r}")
    top1, _, layer = max(scored)
    return layer, top1


def set_best(res: dict, poolings: list[str]) -> None:
    """A model's ``best``: the first pooling's best layer, plus the best layer of each pooling."""
    best = {p: dict(zip(("layer", "top1"), best_layer({int(k): v for k, v in res["layers"].items()}, p)))
            for p in poolings}
    res["best"] = {**best[poolings[0]], "pooling": poolings[0], "by_pooling": best}


def plot_accuracy(report: dict, path) -> None:
    """Top-1 against layer depth, one line per pooling (dashed: random-init baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = {"attentive": "tab:blue", "average": "tab:orange"}
    for model_name, style in (("trained", "-"), ("random_init", "--")):
        res = report.get("models", {}).get(model_name)
        if not res:
            continue
        layers = sorted(int(l) for l in res["layers"])
        for pooling in report["poolings"]:
            acc = [100 * res["layers"][str(l)][pooling]["top1"] for l in layers]
            ax.plot(layers, acc, style, marker="o", color=colors.get(pooling),
                    label=f"{pooling} ({model_name.replace('_', ' ')})")
        if model_name == "trained":
            b = res["best"]
            ax.annotate(f"best: layer {b['layer']}", (b["layer"], 100 * b["top1"]),
                        textcoords="offset points", xytext=(0, -16), ha="center", fontsize=8)
            ax.set_xticks(layers)
    n_classes = report.get("n_classes")
    if n_classes:
        ax.axhline(100 / n_classes, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("layer (0 = token embeddings)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(report.get("title", "probe accuracy by layer"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # keeps the suffix: it picks the format
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def labels_tensor(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


# -- the whole evaluation: checkpoint + tokenizer + dataset -> results.json and probe.png --------

@dataclass
class ProbeJob:
    """Extract (cached) features of each requested layer, fit one probe per layer and pooling;
    ``online``: all probes at once from live forwards over cached tokens (probe_online.py)."""

    checkpoint: str
    tokenizer: str
    data: str
    out: Path
    layers: list[int] | None = None
    poolings: list[str] | None = None
    random_init: bool = False
    cache: str | None = None
    device: str = "auto"
    batch_size: int = 32
    frames: int = 16
    stride: int = 4
    clip: str = "center"  # which window of a longer video: center | first
    max_per_class: int | None = None
    probe: ProbeConfig | None = None
    progress: bool = True
    online: bool = False  # train all probes from live forwards over cached tokens (probe_online.py)
    resume: bool = False  # --online only: continue the run in `out` from its saved state

    def run(self) -> dict:
        from ..ioutil import atomic_write_json
        from ..model.llama import Toto
        from ..tokenizers.base import get_tokenizer
        from ..train.checkpoint import load_model, resolve_checkpoint
        from ..device import resolve_device
        from .features import (FeatureExtractor, SequenceSpec, check_compatible, file_identity,
                               scan_dataset)

        self.out = Path(self.out)
        poolings = self.poolings or list(POOLINGS)
        probe_cfg = (self.probe or ProbeConfig()).validate()
        if self.resume and not self.online:
            raise ConfigError("--resume continues an --online run; the cached mode resumes from its feature "
                              "cache by itself")
        device = resolve_device(self.device)
        tok = get_tokenizer(self.tokenizer, device=str(device))
        ds = scan_dataset(self.data, self.max_per_class)
        spec = SequenceSpec(ds.kind, self.frames, self.stride, self.clip)
        ckpt_dir = resolve_checkpoint(self.checkpoint)
        model, cfg, state = load_model(ckpt_dir, device)
        layout = check_compatible(cfg.model, state, tok, spec, str(ckpt_dir))
        n_layers = cfg.model.n_layers
        layers = sorted(set(self.layers)) if self.layers else list(range(n_layers + 1))
        bad = [l for l in layers if not 0 <= l <= n_layers]
        if bad:
            raise ConfigError(f"--layers {bad} out of range: this model has layers 0..{n_layers}")
        self.out.mkdir(parents=True, exist_ok=True)
        cache_root = Path(self.cache) if self.cache else self.out / "features"
        tok_id = {**tok.identity(), "file": file_identity(self.tokenizer)}

        models = {"trained": (model, {"checkpoint": file_identity(ckpt_dir / "model.safetensors"),
                                      "step": state.get("step")})}
        if self.random_init:
            torch.manual_seed(cfg.train.seed)  # the Trainer's rule: the run's step-0 weights
            rnd = Toto(cfg.model).to(device).eval()
            models["random_init"] = (rnd, {"random_init": cfg.model.__dict__, "seed": cfg.train.seed})

        report = {
            "checkpoint": str(ckpt_dir), "step": state.get("step"), "tokenizer": str(self.tokenizer),
            "data": str(self.data), "kind": ds.kind, "classes": ds.classes, "n_classes": len(ds.classes),
            "layers": layers, "poolings": poolings, "probe": probe_cfg.to_dict(),
            "sequence": spec.to_dict(), "grid": list(tok.grid),
            "skipped_class_folders": ds.skipped_classes,
            "title": f"{Path(str(ckpt_dir)).parent.parent.name or ckpt_dir.name} step {state.get('step')}",
            "models": {},
        }
        if self.online:
            from .probe_online import run_online

            run_online(self, report, models, ds=ds, tokenizer=tok, tok_id=tok_id, layout=layout, spec=spec,
                       layers=layers, poolings=poolings, cfg=probe_cfg, default_heads=cfg.model.n_heads,
                       device=device)
        else:
            for name, (m, ident) in models.items():
                extractor = FeatureExtractor(m, layout, tok, spec, layers,
                                             {"model": ident, "tokenizer": tok_id}, device,
                                             batch_size=self.batch_size, progress=self.progress)
                feats, manifest = extractor.run(ds, cache_root)
                skipped = {s: manifest["splits"][s]["skipped"] for s in feats}
                res = self.model_entry(name, skipped, ds.classes, feats["train"].labels, len(feats["val"].labels),
                                       features=str(feats["train"].cache))
                report["models"][name] = res
                bar = tqdm(total=len(layers) * len(poolings), desc=f"probes ({name})", unit="probe",
                           disable=not self.progress, dynamic_ncols=True)
                for layer in layers:
                    tx, vx = feats["train"].layer(layer), feats["val"].layer(layer)
                    res["layers"][str(layer)] = {}
                    for pooling in poolings:
                        r, _ = train_probe(tx, feats["train"].labels, vx, feats["val"].labels, len(ds.classes),
                                           pooling, probe_cfg, cfg.model.n_heads, device)
                        res["layers"][str(layer)][pooling] = r.to_dict()
                        bar.update(1)
                    atomic_write_json(self.out / "results.json", report)  # partial results survive a kill
                bar.close()
                set_best(res, poolings)
        report["best_layer"] = report["models"]["trained"]["best"]["layer"]
        atomic_write_json(self.out / "results.json", report)
        plot_accuracy(report, self.out / "probe.png")
        return report

    def model_entry(self, name: str, skipped: dict[str, list[dict]], classes: list[str], train_labels,
                    n_val: int, **extra) -> dict:
        """One model's results entry before its probes; says what was skipped and refuses an
        empty split (both modes)."""
        if skipped["train"] or skipped["val"]:
            n_skip = sum(len(v) for v in skipped.values())
            print(f"{name}: skipped {n_skip} unreadable file(s), e.g. {(skipped['train'] + skipped['val'])[0]['reason']}")
        res = {**extra, "n_train": len(train_labels), "n_val": n_val,
               "skipped": {s: [x["path"] for x in v] for s, v in skipped.items()}, "layers": {}}
        if res["n_train"] == 0 or res["n_val"] == 0:
            raise DataError(f"{self.data}: no readable media in the "
                            f"{'train' if res['n_train'] == 0 else 'val'} split")
        empty = [classes[c] for c in range(len(classes)) if not (train_labels == c).any()]
        if empty:
            print(f"warning: classes without any readable train sample: {empty[:5]}")
        return res

    @staticmethod
    def table(report: dict) -> str:
        """A plain-text table: one row per layer, one column per model x pooling (top-1 %)."""
        cols = [(m, p) for m in report["models"] for p in report["poolings"]]
        head = "layer  " + "  ".join(f"{m[:7] + ' ' + p[:4]:>13}" for m, p in cols)
        lines = [head]
        for layer in report["layers"]:
            cells = [report["models"][m]["layers"][str(layer)][p] for m, p in cols]
            row = "  ".join(f"{100 * c['top1']:6.1f}" + (f" /{100 * c['top5']:5.1f}" if c["top5"] is not None
                                                          else " " * 7) for c in cells)
            lines.append(f"{layer:>5}  {row}")
        b = report["models"]["trained"]["best"]
        lines.append(f"top-1 %{' / top-5 %' if report['n_classes'] > 5 else ''} on val; best layer "
                     f"{b['layer']} ({b['pooling']} pooling, top-1 {100 * b['top1']:.1f}%)")
        return "\n".join(lines)
