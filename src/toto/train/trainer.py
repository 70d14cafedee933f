"""Pre-training loop: next-token NLL on token shards with AdamW, warm-up + cosine, gradient
accumulation to a token batch, clipping, validation, JSONL/TensorBoard metrics, checkpoints.

Resuming restores weights, optimizer moments and the loader position; training uses no other
randomness, so a resumed run reproduces the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import Config, validate
from ..data.loader import TrainLoader, split_indices, val_batches
from ..data.shards import ShardDataset
from ..errors import CheckpointError, ConfigError, TrainingError
from ..ioutil import append_jsonl, atomic_write_bytes, atomic_write_json, read_jsonl
from ..model.llama import Toto
from . import checkpoint as ckpt


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available")
    return dev


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on GPU by default; plain fp32 on CPU unless bf16 is asked for."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only, never on norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), **kw)


def shift_targets(batch: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch: (B, L)`` -> inputs ``(B, L-1)`` and next-token targets (pads ignored as -1)."""
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    targets[targets == pad_id] = -1
    return inputs, targets


@dataclass
class RunSummary:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    uniform_loss: float
    checkpoint: str


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        self.out = Path(cfg.train.out_dir)
        self.progress = progress
        self.state: dict = {"tokens": 0}
        start = None
        if resume:
            start = ckpt.latest_checkpoint(self.out)
            if start is None:
                raise CheckpointError(f"--resume: no checkpoint under {self.out / ckpt.CKPT_DIR}")
            saved_cfg, self.state, tensors = ckpt.read_checkpoint(start)
            cfg = self._merge_resume_config(saved_cfg, cfg)
        self.cfg = validate(cfg)
        if not cfg.data.path:
            raise ConfigError("data.path is not set: pass --data DIR (a folder made by `toto tokenize`)")
        self.ds = ShardDataset(cfg.data.path)
        m = cfg.model
        if m.vocab_size is None:
            m.vocab_size = self.ds.layout.vocab_size
        if m.max_seq_len is None:
            m.max_seq_len = self.ds.seq_len
        self.ds.check_model(m)

        self.device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        self.model = Toto(m).to(self.device)
        self.model.activation_checkpointing = cfg.train.activation_checkpointing
        self.optimizer = make_optimizer(self.model, cfg, self.device)

        t = cfg.train
        self.train_idx, self.val_idx = split_indices(len(self.ds), cfg.data.val_fraction,
                                                     cfg.data.val_max_sequences, cfg.data.seed)
        self.loader = TrainLoader(self.ds, self.train_idx, t.micro_batch_size, seed=cfg.data.seed)
        self.seq_tokens = self.ds.seq_len - 1
        self.accum = max(1, round(t.batch_tokens / (t.micro_batch_size * self.seq_tokens)))
        self.step = 0
        if start is not None:
            ckpt.load_weights(self.model, tensors, str(start))
            ckpt.load_optimizer(self.optimizer, start)
            self.loader.load_state_dict(self.state["loader"])
            self.step = int(self.state["step"])
            self._truncate_metrics(self.step)
        self.forward = self.model
        if t.compile:
            self.forward = _try_compile(self.model)

    @staticmethod
    def _merge_resume_config(saved: Config, given: Config) -> Config:
        """Resume with the saved config; only the run's length and logging may change."""
        for name in ("max_steps", "eval_interval", "ckpt_interval", "log_interval", "tensorboard",
                     "device", "keep_checkpoints"):
            setattr(saved.train, name, getattr(given.train, name))
        if given.data.path:
            saved.data.path = given.data.path
        return saved

    # -- metrics ---------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _truncate_metrics(self, step: int) -> None:
        """Drop records a killed run logged after its last checkpoint; they will be redone."""
        kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def _log(self, record: dict, tb) -> None:
        append_jsonl(self.metrics_path, record)
        if tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, record["step"])

    # -- loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if len(self.val_idx) == 0:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for batch in val_batches(self.ds, self.val_idx, self.cfg.train.micro_batch_size,
                                 self.cfg.train.eval_batches):
            inputs, targets = shift_targets(batch.to(self.device), self.ds.layout.pad)
            with autocast_for(self.device, self.cfg.train.dtype):
                _, loss = self.forward(inputs, targets)
            n = int((targets != -1).sum())
            total, count = total + float(loss) * n, count + n
        self.model.train()
        return total / max(count, 1)

    def train_step(self) -> tuple[float, float]:
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            batch = self.loader.next_batch().to(self.device, non_blocking=True)
            inputs, targets = shift_targets(batch, self.ds.layout.pad)
            with autocast_for(self.device, t.dtype):
                _, loss = self.forward(inputs, targets)
            (loss / self.accum).backward()
            total += loss.detach() / self.accum
        total = float(total)  # one host sync per optimizer step
        if not math.isfinite(total):
            raise TrainingError(f"loss became {total} at step {self.step}; lower train.lr or check the "
                                f"data (last checkpoint: {ckpt.latest_checkpoint(self.out)})")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, float(grad_norm)

    def save(self) -> Path:
        state = {"tokens": self.state["tokens"], "loader": self.loader.state_dict(),
                 "vocab": self.ds.layout.to_dict(), "grid": list(self.ds.geometry.grid),
                 "frames_per_sequence": self.ds.geometry.frames_per_sequence,
                 "tokenizer": self.ds.index.get("tokenizer", {})}
        return ckpt.save_checkpoint(self.out, self.step, self.model, self.cfg, state, self.optimizer,
                                    keep=self.cfg.train.keep_checkpoints)

    def fit(self, until: int | None = None) -> RunSummary:
        """Train to ``train.max_steps`` (or stop early at step ``until``, with a checkpoint there;
        the schedule still follows max_steps, so a later ``--resume`` continues seamlessly)."""
        t = self.cfg.train
        stop = min(until or t.max_steps, t.max_steps)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", self.cfg.to_dict())
        tb = _tensorboard(self.out) if t.tensorboard else None
        tokens_per_step = self.accum * t.micro_batch_size * self.seq_tokens
        uniform = math.log(self.ds.layout.vocab_size)
        self.model.train()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        loss, val, last_ckpt = float("nan"), None, ckpt.latest_checkpoint(self.out)
        tic = time.perf_counter()
        try:
            while self.step < stop:
                loss, gnorm = self.train_step()
                self.step += 1
                self.state["tokens"] += tokens_per_step
                toc = time.perf_counter()
                tok_s = tokens_per_step / max(toc - tic, 1e-9)
                tic = toc
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    self._log({"step": self.step, "loss": loss, "lr": lr_at(self.step - 1, t),
                               "grad_norm": gnorm, "tokens": self.state["tokens"], "tok_per_s": tok_s}, tb)
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    val = self.evaluate()
                    if val is not None:
                        self._log({"step": self.step, "val_loss": val}, tb)
                        bar.write(f"step {self.step}: train {loss:.4f}  val {val:.4f}  "
                                  f"(uniform {uniform:.4f})")
                if self.step % t.ckpt_interval == 0 or self.step == stop:
                    last_ckpt = self.save()
        except KeyboardInterrupt:
            bar.write(f"interrupted at step {self.step}; saving a checkpoint to resume from")
            last_ckpt = self.save()
            raise
        finally:
            bar.close()
            if tb is not None:
                tb.close()
        summary = RunSummary(self.step, self.state["tokens"], loss, val, uniform, str(last_ckpt))
        atomic_write_json(self.out / "summary.json", summary.__dict__)
        return summary


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out / "tb"))


def _try_compile(model):
    try:
        return torch.compile(model)
    except Exception as e:  # compile support varies by platform; training still works without it
        print(f"torch.compile unavailable ({e}); running eagerly")
        return model
