"""Probing: one attentive (the paper's probe) and one average-pooling head (toto.tasks.heads) on
every layer of a frozen model, against the random-init baseline.

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

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..commands.argtypes import nonnegative_float, nonnegative_int, positive_int
from ..config import option
from ..errors import ConfigError, DataError
from ..ioutil import save_figure
from ..tasks.base import topk_accuracy
from ..tasks.heads import POOLINGS, probe_heads

ONLINE_STATE = "online_state"  # --online: OUT/online_state/<model>/epoch_<e>/


@dataclass
class ProbeConfig:
    """Probe hyper-parameters; defaults suit a few thousand to a few hundred thousand samples."""

    epochs: int = option(20, "", type=positive_int)
    batch_size: int = option(256, "", flag="--probe-batch-size", type=positive_int)
    lr: float = option(1e-3, "AdamW peak learning rate", type=nonnegative_float)
    weight_decay: float = option(0.05, "", type=nonnegative_float)
    warmup_epochs: float = option(2.0, "", type=nonnegative_float)  # linear, then cosine to lr * min_lr_ratio
    min_lr_ratio: float = 0.0
    heads: int = option(0, "attentive-probe heads (0, the default: the model's)", type=nonnegative_int)
    norm: str = option("batchnorm", "normalisation of the pooled vector, no affine parameters",
                       choices=("batchnorm", "layernorm"))
    seed: int = option(0, "probe initialisation and batch order")

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

    def loop(self):
        """The framework's loop settings (toto.tasks.base.Loop)."""
        from ..tasks.base import Loop

        return Loop(self.epochs, self.batch_size, self.warmup_epochs, self.min_lr_ratio, seed=self.seed)


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


def score_probes(model, val_logits: dict | None, last_loss: dict, train, val, batch_size: int,
                 device) -> dict[str, ProbeResult]:
    """Every probe of a trained ``model`` (a TaskModel): val after the last epoch (``fit``'s
    logits, or a new pass for a run that had finished before: None), train top-1 by one pass over
    the train split, the last step's loss."""
    from ..tasks.base import Task, predict

    if val_logits is None:
        val_logits = predict(model, val, batch_size, device)[0]
    train_logits, _ = predict(model, train, batch_size, device)
    y = torch.as_tensor(train.targets)
    out = {}
    for key in model.heads:
        v = Task().metrics(val_logits[key], val.targets)
        out[key] = ProbeResult(top1=v["top1"], top5=v["top5"], train_top1=topk_accuracy(train_logits[key], y, 1),
                               final_loss=float(last_loss[key]))
    return out


def train_probe(train_x: torch.Tensor, train_y, val_x: torch.Tensor, val_y, n_classes: int, pooling: str,
                cfg: ProbeConfig, default_heads: int, device: str | torch.device = "cpu"):
    """Fit one probe on features ``train_x: (N, T, D)`` of one layer (any float dtype, kept on
    the CPU) and score it on the validation split -> (ProbeResult, the TaskModel holding it).
    Deterministic for a given ``cfg.seed``."""
    from ..tasks.base import Split, TaskModel, fit, make_optimizer

    cfg.validate()
    device = torch.device(device)
    if len(train_x) == 0 or len(val_x) == 0:
        raise ConfigError("probe: the train and val splits both need at least one sample")
    key = probe_key(0, pooling)
    model = TaskModel(probe_heads(train_x.shape[-1], n_classes, {key: (0, pooling)}, cfg.heads or default_heads,
                                  cfg.norm, cfg.seed)).to(device)
    train = Split(np.asarray(train_y), features={0: train_x})
    val = Split(np.asarray(val_y), features={0: val_x})
    stats = fit(model, make_optimizer(model, 0.0, cfg.lr, cfg.weight_decay, device), train, val, cfg.loop(),
                device=device, progress=False)
    bs = cfg.loop().steps(len(train))[0]
    return score_probes(model, stats.val_logits, stats.last_loss, train, val, bs, device)[key], model


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
    save_figure(fig, path)


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
        from ..tasks.base import TaskRun
        from ..train.distributed import world
        from ..tasks.classify import ClassifyTask

        self.out = Path(self.out)
        poolings = self.poolings or list(POOLINGS)
        cfg = (self.probe or ProbeConfig()).validate()
        if self.resume and not self.online:
            raise ConfigError("--resume continues an --online run; the cached mode resumes from its feature "
                              "cache by itself")
        task = ClassifyTask(self.data, {}, frames=self.frames, stride=self.stride, clip=self.clip,
                            max_per_class=self.max_per_class, n_heads=cfg.heads, norm=cfg.norm, seed=cfg.seed,
                            batch_size=self.batch_size)
        run = TaskRun(self.checkpoint, self.tokenizer, self.out, cfg.loop(), head_lr=cfg.lr,
                      weight_decay=cfg.weight_decay, random_init=self.random_init, device=self.device,
                      cache=self.cache, resume=self.resume, progress=self.progress)
        bb = run.load(task.spec)
        n_layers = bb.cfg.model.n_layers
        layers = bb.check_layers(sorted(set(self.layers)) if self.layers else range(n_layers + 1), "--layers")
        task.probes = {probe_key(l, p): (l, p) for l in layers for p in poolings}
        ds = task.ds
        report = {
            "checkpoint": str(bb.path), "step": bb.state.get("step"), "tokenizer": str(self.tokenizer),
            "data": str(self.data), "kind": ds.kind, "classes": ds.classes, "n_classes": len(ds.classes),
            "layers": layers, "poolings": poolings, "probe": cfg.to_dict(),
            "sequence": task.spec.to_dict(), "grid": list(bb.tokenizer.grid),
            "skipped_class_folders": ds.skipped_classes,
            "title": f"{bb.path.parent.parent.name or bb.path.name} step {bb.state.get('step')}",
            "models": {},
        }
        if self.online:
            self._run_online(run, task, bb, report, layers, poolings, cfg)
        else:
            self._run_cached(run, task, bb, report, layers, poolings, cfg)
        report["best_layer"] = report["models"]["trained"]["best"]["layer"]
        if world()[0] == 0:
            atomic_write_json(self.out / "results.json", report)
            plot_accuracy(report, self.out / "probe.png")
        return report

    def _run_cached(self, run, task, bb, report: dict, layers: list[int], poolings: list[str],
                    cfg: ProbeConfig) -> None:
        """Each layer's features extracted once into the feature cache, then that layer's probes
        trained on them, one layer in memory at a time."""
        from ..ioutil import atomic_write_json
        from ..tasks.base import Split, TaskModel, fit, make_optimizer, rank0_first
        from ..train.distributed import world
        from .features import FeatureExtractor

        device, main = run.torch_device, world()[0] == 0
        cache_root = Path(self.cache) if self.cache else self.out / "features"
        for name, (m, ident) in bb.models(self.random_init).items():
            extractor = FeatureExtractor(m, bb.layout, bb.tokenizer, task.spec, layers,
                                         {"model": ident, "tokenizer": bb.tok_id}, device,
                                         batch_size=self.batch_size, progress=self.progress and main)
            feats, manifest = rank0_first(lambda: extractor.run(task.ds, cache_root))
            skipped = {s: manifest["splits"][s]["skipped"] for s in feats}
            res = self.model_entry(name, skipped, task.ds.classes, feats["train"].labels, len(feats["val"].labels),
                                   features=str(feats["train"].cache.folder))
            report["models"][name] = res
            bar = tqdm(total=len(layers) * len(poolings), desc=f"probes ({name})", unit="probe",
                       disable=not (self.progress and main), dynamic_ncols=True)
            for layer in layers:
                task.probes = {probe_key(layer, p): (layer, p) for p in poolings}
                model = TaskModel(task.heads(m.cfg.dim, m.cfg.n_heads)).to(device)
                split = {s: Split(np.asarray(feats[s].labels), features={layer: feats[s].layer(layer)}) for s in feats}
                opt = make_optimizer(model, 0.0, cfg.lr, cfg.weight_decay, device)
                stats = fit(model, opt, split["train"], split["val"], run.loop, device=device, progress=False)
                got = score_probes(model, stats.val_logits, stats.last_loss, split["train"], split["val"],
                                   run.loop.steps(len(split["train"]))[0], device)
                res["layers"][str(layer)] = {p: got[probe_key(layer, p)].to_dict() for p in poolings}
                bar.update(len(poolings))
                if main:
                    atomic_write_json(self.out / "results.json", report)  # partial results survive a kill
            bar.close()
            set_best(res, poolings)

    def _run_online(self, run, task, bb, report: dict, layers: list[int], poolings: list[str],
                    cfg: ProbeConfig) -> None:
        """All probes of a model trained together from live forwards over the token cache (the
        framework's frozen mode); each model (trained, then random init) is one run."""
        from ..ioutil import append_jsonl

        splits = run.read(task, bb)
        report.update(mode="online", token_cache=str(task.cache))
        skipped = {s: t.skipped for s, t in task.tokens.items()}
        for name in ["trained"] + ["random_init"] * self.random_init:
            report["models"][name] = self.model_entry(name, skipped, task.ds.classes, splits["train"].targets,
                                                      len(splits["val"]), features=None)
        metrics = self.out / "metrics.jsonl"

        def on_epoch(name, s):
            append_jsonl(metrics, {"model": name, "epoch": s.epoch, "step": s.step, "lr": s.lr_factor * cfg.lr,
                                   "time_s": s.time_s, "train_loss": s.train_loss,
                                   "val_top1": {k: v["top1"] for k, v in s.val.items()}})
            if self.progress:
                top1, key = max((v["top1"], k) for k, v in s.val.items())
                tqdm.write(f"{name} epoch {s.epoch}/{cfg.epochs}: best val top-1 {100 * top1:.1f}% ({key})")

        done = run.train(task, bb, splits, {"probe": cfg.to_dict(), "layers": layers, "poolings": poolings},
                         state_dir=lambda name: self.out / ONLINE_STATE / name, on_epoch=on_epoch)
        bs = run.loop.steps(len(splits["train"]))[0]
        for name, f in done.items():
            got = score_probes(f.model, f.stats and f.stats.val_logits, f.last_loss, splits["train"], splits["val"],
                               bs, run.torch_device)
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
