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

Probes train on the downstream-task framework (toto.tasks.base): AdamW with a linear warm-up
and cosine decay per optimizer step, given the same seed, features and settings deterministic,
and under torchrun the same numbers on any number of ranks (BatchNorm statistics span the
global batch). Two ways to feed them:

- cached (default): each layer's features are extracted once into a feature cache
  (toto.eval.features), then that layer's probes train on them, one layer in memory at a time.
- online (``--online``, for data sets whose features do not fit on disk: ImageNet at 16x16
  tokens and width 768 is 500 GB a layer, its token cache 660 MB): the probes of every layer
  and pooling train together from one no-grad forward per batch over the cached token
  sequences (the framework's frozen mode), features rounded to float16 as the cache stores
  them, so both ways end on the same numbers up to float rounding. Val is scored after every
  epoch (``metrics.jsonl``, one record per model and epoch) and each model's probes are saved
  under ``OUT/online_state/<model>/``, from which ``--resume`` continues.
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
from ..tasks.base import GlobalBatchNorm1d, topk_accuracy

POOLINGS = ("attentive", "average")
ONLINE_STATE = "online_state"  # --online: OUT/online_state/<model>/epoch_<e>/


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
        self.norm = (GlobalBatchNorm1d(dim, affine=False) if norm == "batchnorm"
                     else nn.LayerNorm(dim, elementwise_affine=False))
        self.head = nn.Linear(dim, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # small start, as MAE's probe head
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.pool(self.token_norm(x.float()))))


@dataclass
class ProbeResult:
    top1: float
    top5: float | None
    train_top1: float
    final_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def probe_key(layer: int, pooling: str) -> str:
    return f"layer{layer}_{pooling}"


def make_probes(dim: int, n_classes: int, layers: list[int], poolings: list[str], cfg: ProbeConfig,
                default_heads: int, device) -> tuple[dict, torch.optim.AdamW]:
    """One probe per layer and pooling, each drawn right after seeding with ``cfg.seed`` (every
    probe starts the same whatever ran before it, cached or online), and one AdamW over all of
    them (decay on matrices only; AdamW updates each parameter on its own, so this is the same as
    one optimizer per probe)."""
    heads = {}
    for layer in layers:
        for pooling in poolings:
            torch.manual_seed(cfg.seed)
            heads[probe_key(layer, pooling)] = (layer, Probe(dim, n_classes, pooling, cfg.heads or default_heads,
                                                             cfg.norm).to(device))
    params = [p for _, h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                              "base_lr": cfg.lr},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "base_lr": cfg.lr}],
                            lr=cfg.lr)
    return heads, opt


def fit_probes(model, opt, train, val, cfg: ProbeConfig, device, **kw) -> dict[str, ProbeResult]:
    """Train every probe of ``model`` (a TaskModel) with the framework's loop, then score each:
    val after the last epoch, train top-1 by one pass over the train split."""
    from ..tasks.base import Loop, Task, fit, predict

    loop = Loop(cfg.epochs, cfg.batch_size, cfg.warmup_epochs, cfg.min_lr_ratio, seed=cfg.seed)
    stats = fit(model, opt, train, val, loop, device=device, **kw)
    bs = loop.steps(len(train))[0]
    if stats is None:  # a finished run resumed: score what it saved
        val_logits, last = predict(model, val, bs, device)[0], kw["state"].last_loss
    else:
        val_logits, last = stats.val_logits, stats.last_loss
    train_logits, _ = predict(model, train, bs, device, progress=kw.get("progress", False), desc="train top-1")
    y = torch.as_tensor(train.targets)
    out = {}
    for key in model.heads:
        v = Task().metrics(val_logits[key], val.targets)
        out[key] = ProbeResult(top1=v["top1"], top5=v["top5"], train_top1=topk_accuracy(train_logits[key], y, 1),
                               final_loss=float(last[key]))
    return out


def train_probe(train_x: torch.Tensor, train_y, val_x: torch.Tensor, val_y, n_classes: int, pooling: str,
                cfg: ProbeConfig, default_heads: int, device: str | torch.device = "cpu"):
    """Fit one probe on features ``train_x: (N, T, D)`` (any float dtype, kept on the CPU) and
    score it on the validation split -> (ProbeResult, the TaskModel holding it). Deterministic
    for a given ``cfg.seed``."""
    from ..tasks.base import Split, TaskModel

    cfg.validate()
    device = torch.device(device)
    if len(train_x) == 0 or len(val_x) == 0:
        raise ConfigError("probe: the train and val splits both need at least one sample")
    heads, opt = make_probes(train_x.shape[-1], n_classes, [0], [pooling], cfg, default_heads, device)
    model = TaskModel(heads)
    r = fit_probes(model, opt, Split(np.asarray(train_y), features={0: train_x}),
                   Split(np.asarray(val_y), features={0: val_x}), cfg, device, progress=False)
    return r[probe_key(0, pooling)], model


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


# -- the whole evaluation: checkpoint + tokenizer + dataset -> results.json and probe.png --------

@dataclass
class ProbeJob:
    """Extract (cached) features of each requested layer, fit one probe per layer and pooling;
    ``online``: all probes at once from live forwards over cached tokens."""

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
    online: bool = False  # train all probes from live forwards over cached tokens
    resume: bool = False  # --online only: continue the run in `out` from its saved state

    def run(self) -> dict:
        from ..ioutil import atomic_write_json
        from ..model.llama import Toto
        from ..tasks.base import Split, TaskModel, rank0_first
        from ..tokenizers.base import get_tokenizer
        from ..train.checkpoint import load_model, resolve_checkpoint
        from ..train.distributed import init_distributed
        from .features import (FeatureExtractor, SequenceSpec, check_compatible, file_identity,
                               scan_dataset)

        self.out = Path(self.out)
        poolings = self.poolings or list(POOLINGS)
        probe_cfg = (self.probe or ProbeConfig()).validate()
        if self.resume and not self.online:
            raise ConfigError("--resume continues an --online run; the cached mode resumes from its feature "
                              "cache by itself")
        info, device = init_distributed(self.device)
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
            self._run_online(report, models, ds=ds, tokenizer=tok, tok_id=tok_id, layout=layout, spec=spec,
                             layers=layers, poolings=poolings, cfg=probe_cfg, default_heads=cfg.model.n_heads,
                             device=device)
        else:
            for name, (m, ident) in models.items():
                extractor = FeatureExtractor(m, layout, tok, spec, layers,
                                             {"model": ident, "tokenizer": tok_id}, device,
                                             batch_size=self.batch_size, progress=self.progress and info.is_main)
                feats, manifest = rank0_first(lambda: extractor.run(ds, cache_root))
                skipped = {s: manifest["splits"][s]["skipped"] for s in feats}
                res = self.model_entry(name, skipped, ds.classes, feats["train"].labels, len(feats["val"].labels),
                                       features=str(feats["train"].cache))
                report["models"][name] = res
                bar = tqdm(total=len(layers) * len(poolings), desc=f"probes ({name})", unit="probe",
                           disable=not (self.progress and info.is_main), dynamic_ncols=True)
                for layer in layers:  # one layer's features in memory at a time
                    heads, opt = make_probes(cfg.model.dim, len(ds.classes), [layer], poolings, probe_cfg,
                                             cfg.model.n_heads, device)
                    split = {s: Split(np.asarray(feats[s].labels), features={layer: feats[s].layer(layer)})
                             for s in feats}
                    got = fit_probes(TaskModel(heads), opt, split["train"], split["val"], probe_cfg, device,
                                     progress=False)
                    res["layers"][str(layer)] = {p: got[probe_key(layer, p)].to_dict() for p in poolings}
                    bar.update(len(poolings))
                    if info.is_main:
                        atomic_write_json(self.out / "results.json", report)  # partial results survive a kill
                bar.close()
                set_best(res, poolings)
        report["best_layer"] = report["models"]["trained"]["best"]["layer"]
        if info.is_main:
            atomic_write_json(self.out / "results.json", report)
            plot_accuracy(report, self.out / "probe.png")
        return report

    def _run_online(self, report: dict, models: dict, *, ds, tokenizer, tok_id: dict, layout, spec,
                    layers: list[int], poolings: list[str], cfg: ProbeConfig, default_heads: int, device) -> None:
        """Fill ``report["models"]`` as the cached path does, from live forwards over cached
        tokens; each model (trained, then random init) is one framework run."""
        from ..ioutil import append_jsonl
        from ..tasks.base import RunState, Split, TaskModel, rank0_first, world
        from .features import tokenize_splits

        main = world()[0] == 0
        # the same identity as toto finetune's: one --cache folder serves both commands
        data, cache = rank0_first(lambda: tokenize_splits(
            ds, tokenizer, layout, spec, {"tokenizer": tok_id}, Path(self.cache) if self.cache else self.out / "tokens",
            batch_size=self.batch_size, progress=self.progress and main))
        train, val = (Split(data[s].labels, data[s].tokens) for s in ("train", "val"))
        skipped = {s: data[s].skipped for s in data}
        report.update(mode="online", token_cache=str(cache))
        for name in models:
            report["models"][name] = self.model_entry(name, skipped, ds.classes, data["train"].labels, len(val),
                                                      features=None)
        metrics = self.out / "metrics.jsonl"
        for name, (model, ident) in models.items():
            heads, opt = make_probes(model.cfg.dim, len(ds.classes), layers, poolings, cfg, default_heads, device)
            run_id = {"model": ident, "token_cache": cache.name, "layers": layers, "poolings": poolings,
                      "probe": cfg.to_dict(), "n_train": len(train), "n_val": len(val)}
            state = RunState(self.out / ONLINE_STATE / name, run_id, resume=self.resume, what="an online probe run",
                             metrics=metrics, filter=lambda r, name=name: r.get("model") == name)

            def on_epoch(s, name=name):
                append_jsonl(metrics, {"model": name, "epoch": s.epoch, "step": s.step, "lr": s.lr_factor * cfg.lr,
                                       "time_s": s.time_s, "train_loss": s.train_loss,
                                       "val_top1": {k: v["top1"] for k, v in s.val.items()}})
                if self.progress:
                    top1, key = max((v["top1"], k) for k, v in s.val.items())
                    tqdm.write(f"{name} epoch {s.epoch}/{cfg.epochs}: best val top-1 {100 * top1:.1f}% ({key})")

            got = fit_probes(TaskModel(heads, model, pad=layout.pad), opt, train, val, cfg, device, state=state,
                             on_epoch=on_epoch, progress=self.progress, desc=f"{name} ")
            res = report["models"][name]
            for layer in layers:
                res["layers"][str(layer)] = {p: got[probe_key(layer, p)].to_dict() for p in poolings}
            set_best(res, poolings)

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
