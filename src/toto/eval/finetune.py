"""Fine-tuning a pre-trained model with an attentive probe: the paper's ImageNet recipe
(arXiv 2501.05453, Sec. 4), cross-entropy on the probe plus the next-token loss of the whole
model; the framework's fine-tuned mode (toto.tasks.base) on the classification task
(toto.tasks.classify).

    batch: (B, L) ids  [start] + codes + [end]        (L = 2 + frames x h x w)
      -> inputs (B, L-1), next-token targets (B, L-1)  (toto.train.optim.shift_targets)
      -> one pass of the unfrozen Toto:
           residual stream at layer ``layer``, code positions only: (B, L-2, D) -> Probe -> (B, C)
           final logits (B, L-1, V) -> next-token NLL, exactly the pre-training loss
      loss = CE(probe logits, label) + ntp_weight * NTP

Why the NTP term: it keeps the trunk close to what pre-training learned while the probe's
gradient reshapes it for the labels; ``ntp_weight=0`` is plain fine-tuning of the trunk (then
blocks above ``layer`` and the output head get no gradient and are not even run).

The probe is ``toto.tasks.heads.Probe`` with attentive pooling, fed the same features
``toto probe`` extracts (layer ``l`` = output of block ``l``, no final norm, code positions).
Token sequences are encoded once per split and cached (``tokenize_splits``); training is
AdamW (trunk and probe with their own learning rates, decay on matrices only), linear warm-up
+ cosine per step, gradient clipping, bf16 autocast on GPU, under torchrun on any number of
ranks. A checkpoint after every epoch holds the trunk (a normal toto checkpoint: ``toto
probe``/``forecast`` load it), the probe, the optimizer and the epoch; batch order is a pure
function of (seed, epoch) and nothing else draws random numbers after initialisation, so
``resume`` reproduces an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ..commands.argtypes import nonnegative_float, nonnegative_int, positive_int
from ..config import option
from ..errors import ConfigError, DataError
from ..ioutil import append_jsonl, atomic_write_json, read_jsonl, save_figure
from .probe import ProbeConfig

@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters; the defaults suit a small pre-trained model."""

    layer: int | None = option(None, "layer the attentive probe reads (0 = embeddings; default: the middle one, "
                               "n_layers // 2, since decoder-only models hold the most class information in "
                               "their middle layers)", type=nonnegative_int)
    epochs: int = option(10, "", type=positive_int)
    batch_size: int = option(32, "sequences per step", type=positive_int)
    lr: float = option(1e-4, "peak learning rate of the pre-trained trunk; 0 freezes it", type=nonnegative_float)
    probe_lr: float = option(ProbeConfig.lr, "peak learning rate of the probe (a fresh head learns fast)",
                             type=nonnegative_float)
    ntp_weight: float = option(1.0, "W in loss = CE + W x next-token NLL (0: plain fine-tuning)",
                               type=nonnegative_float)
    weight_decay: float = option(0.05, "AdamW decay on matrices only", type=nonnegative_float)
    warmup_epochs: float = option(1.0, "linear warm-up, then cosine decay to 0", type=nonnegative_float)
    min_lr_ratio: float = 0.0
    grad_clip: float = option(1.0, "max global gradient norm, 0 = off", type=nonnegative_float)
    heads: int = option(0, "attentive-probe heads (0, the default: the model's)", type=nonnegative_int)
    norm: str = "batchnorm"  # normalisation of the pooled vector (see toto.eval.probe)
    dtype: str = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    seed: int = option(0, "probe initialisation and batch order")

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

    def loop(self, until: int | None = None):
        """The framework's loop settings (toto.tasks.base.Loop)."""
        from ..tasks.base import Loop

        return Loop(self.epochs, self.batch_size, self.warmup_epochs, self.min_lr_ratio, self.grad_clip, self.seed,
                    until=until)


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
        from ..tasks.base import TaskRun
        from ..train.distributed import world
        from ..tasks.classify import ClassifyTask

        cfg = (self.cfg or FinetuneConfig()).validate()
        if self.until is not None and self.until < 1:
            raise ConfigError(f"finetune: --until must be >= 1, got {self.until}")
        self.out = Path(self.out)
        task = ClassifyTask(self.data, {}, frames=self.frames, stride=self.stride, clip=self.clip,
                            max_per_class=self.max_per_class, n_heads=cfg.heads, norm=cfg.norm, seed=cfg.seed)
        ds = task.ds
        if len(ds.classes) < 2:
            raise DataError(f"{self.data}: fine-tuning a classifier needs at least 2 classes, found "
                            f"{len(ds.classes)} ({ds.classes})")
        run = TaskRun(self.checkpoint, self.tokenizer, self.out, cfg.loop(self.until),
                      finetune=True, lr=cfg.lr, head_lr=cfg.probe_lr, weight_decay=cfg.weight_decay,
                      ntp_weight=cfg.ntp_weight, device=self.device, dtype=cfg.dtype, cache=self.cache,
                      resume=self.resume, keep=self.keep, progress=self.progress)
        bb = run.load(task.spec)
        n_layers = bb.cfg.model.n_layers
        layer = bb.check_layers([n_layers // 2 if cfg.layer is None else cfg.layer])[0]
        cfg = replace(cfg, layer=layer)
        task.probes = {"probe": (layer, "attentive")}

        splits = run.read(task, bb)
        main = world()[0] == 0
        n_train, n_val = len(splits["train"]), len(splits["val"])
        skipped = {s: t.skipped for s, t in task.tokens.items()}
        if any(skipped.values()) and main:
            first = (skipped["train"] + skipped["val"])[0]
            print(f"skipped {sum(map(len, skipped.values()))} unreadable file(s), e.g. {first['reason']}")
        if n_train < 2 or n_val < 1:
            raise DataError(f"{self.data}: {n_train} readable train and {n_val} val sample(s); fine-tuning "
                            f"needs at least 2 train and 1 val")
        report = {"checkpoint": str(bb.path), "step": bb.state.get("step"), "tokenizer": str(self.tokenizer),
                  "data": str(self.data), "kind": ds.kind, "classes": ds.classes, "n_classes": len(ds.classes),
                  "chance": 1 / len(ds.classes), "layer": layer, "n_layers": n_layers,
                  "finetune": cfg.to_dict(), "sequence": task.spec.to_dict(), "grid": list(bb.tokenizer.grid),
                  "n_train": n_train, "n_val": n_val, "token_cache": str(task.cache),
                  "skipped": {s: [x["path"] for x in v] for s, v in skipped.items()},
                  "skipped_class_folders": ds.skipped_classes}

        def on_epoch(name, s):
            val = {**s.val["probe"], "ntp": s.val_ntp}
            ntp = s.train_ntp if cfg.ntp_weight > 0 else None
            record = {"epoch": s.epoch, "step": s.step, "lr": s.lr_factor * cfg.lr,
                      "probe_lr": s.lr_factor * cfg.probe_lr,
                      "train_loss": s.train_loss["probe"] + (cfg.ntp_weight * ntp if ntp is not None else 0.0),
                      "train_ce": s.train_loss["probe"], "train_ntp": ntp, "train_top1": s.train_correct["probe"],
                      "val_top1": val["top1"], "val_top5": val["top5"], "val_ce": val["ce"], "val_ntp": val["ntp"],
                      "time_s": s.time_s}
            append_jsonl(self.out / "metrics.jsonl", record)
            if self.progress:
                tqdm.write(f"epoch {s.epoch}: train loss {record['train_loss']:.4f}  val top-1 "
                           f"{100 * val['top1']:.1f}%  val CE {val['ce']:.4f}  val NTP {val['ntp']:.4f}")
            task.save_predictions(self.out / "val_predictions.npz", s.val_logits["probe"])
            self._write_results(report)

        run.train(task, bb, splits, {"finetune": cfg.to_dict()}, state_dir=lambda name: self.out, on_epoch=on_epoch)
        return self._write_results(report, plot=True) if main else report

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
    save_figure(fig, path)
