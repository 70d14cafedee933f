"""Pre-training loop: next-token NLL on token shards with AdamW, warm-up + cosine, gradient
accumulation to a token batch, clipping, validation, JSONL/TensorBoard metrics, checkpoints.

Runs alone or under torchrun (DDP or FSDP2). Resuming restores weights, optimizer moments and
the loader position; training uses no other randomness, so a resumed run reproduces the
uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config, data_paths, validate
from ..data.loader import val_batches
from ..data.mix import describe_sources, make_loader, mix_weights, open_shards, split_sources
from ..errors import CheckpointError, ConfigError, TrainingError
from ..ioutil import append_jsonl, atomic_write_json, clear_folder, dir_lock, read_jsonl, run_files
from ..jobstate import refuse_changed, trim_metrics
from ..model.llama import Toto
from ..tokenizers.base import IDENTITY_KEYS, check_identity
from . import checkpoint as ckpt
from .distributed import all_reduce_sum, barrier, init_distributed, wrap_model
from .optim import adamw, autocast_for, cosine_lr, param_groups, set_lr, shift_targets, uses_bf16

# architecture fields a fine-tuning run inherits from the checkpoint it starts from
ARCH_FIELDS = ("n_layers", "n_heads", "dim", "ffn_dim", "vocab_size", "norm_eps", "tie_embeddings",
               "init_std", "mup_base_dim")


@dataclass
class RunSummary:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    uniform_loss: float
    checkpoint: str
    parallel: str = "none"  # e.g. "fsdp/nccl x1": what actually ran, not just what was asked
    data: list = field(default_factory=list)  # folders, sizes and mixing weights trained on


class Trainer:
    """``init_from`` starts a new run from another run's weights (e.g. resolution fine-tuning
    with longer sequences and a new RoPE base); ``resume`` continues this run exactly."""

    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True,
                 init_from: str | Path | None = None, overwrite: bool = False,
                 allow_incomplete: bool = False):
        if resume and init_from:
            raise ConfigError("--resume continues this run; --init-from starts a new one: pass only one")
        if resume and overwrite:
            raise ConfigError("--resume continues the run in the folder; --overwrite deletes it: pass only one")
        self.dist, self.device = init_distributed(cfg.train.device)
        self.out = Path(cfg.train.out_dir)
        self.progress = progress and self.dist.is_main
        self._lock = contextlib.ExitStack()
        self._claim_folder(resume, overwrite)
        self._signals = StopSignals(install=False)  # fit() installs the handlers while it runs
        self.stop_requested = False
        self.state: dict = {"tokens": 0}
        start, tensors, origin = None, None, {}
        if resume:
            start = ckpt.latest_checkpoint(self.out)
            if start is None:
                raise CheckpointError(f"--resume: no checkpoint under {self.out / ckpt.CKPT_DIR}")
            saved_cfg, self.state, tensors = ckpt.read_checkpoint(start)
            origin = self.state
            cfg = self._merge_resume_config(saved_cfg, cfg)
        elif init_from:
            src_cfg, src_state, tensors = ckpt.read_checkpoint(init_from)
            origin = src_state
            for name in ARCH_FIELDS:
                setattr(cfg.model, name, getattr(src_cfg.model, name))
            self.state["init_from"] = src_state["path"]
        self.cfg = validate(cfg)
        if not cfg.data.path:
            raise ConfigError("data.path is not set: pass --data DIR (a folder made by `toto tokenize`)")
        self.ds = open_shards(data_paths(cfg.data), allow_incomplete)
        # the shards must come from the tokenizer the weights were trained on; --init-from may
        # change the resolution (resolution fine-tuning), not the codebook
        check_identity(origin.get("tokenizer"), self.ds.index.get("tokenizer") or {},
                       f"checkpoint {start or init_from}", CheckpointError,
                       keys=tuple(k for k in IDENTITY_KEYS if not (init_from and k == "resolution")))
        m = cfg.model
        if m.vocab_size is None:
            m.vocab_size = self.ds.layout.vocab_size
        if m.max_seq_len is None or init_from:
            m.max_seq_len = self.ds.seq_len if m.max_seq_len is None else max(m.max_seq_len, self.ds.seq_len)
        self.ds.check_model(m)

        t = cfg.train
        torch.manual_seed(t.seed)
        self.model = Toto(m).to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.wrapped = wrap_model(self.model, t.parallel, self.dist, self.device)
        self.optimizer = adamw(param_groups(self.model, t.weight_decay, self.model.width_mult), self.device,
                               t.lr, (t.beta1, t.beta2))

        splits = split_sources(self.ds, cfg.data.val_fraction, cfg.data.val_max_sequences, cfg.data.seed)
        self.train_idx = np.concatenate([tr for tr, _ in splits])
        self.val_idx = np.concatenate([va for _, va in splits])
        self.val_per_source = [va for _, va in splits]
        weights = mix_weights(cfg.data.weights, [len(tr) for tr, _ in splits])
        self.sources = describe_sources(self.ds, [tr for tr, _ in splits], weights)
        self.loader = make_loader(self.ds, [tr for tr, _ in splits], weights, t.micro_batch_size,
                                  seed=cfg.data.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        if start is not None:
            _check_same_sources(self.state["data_sources"], self.sources)
        self.val_by_source: dict[str, float] = {}
        self.seq_tokens = self.ds.seq_len - 1
        per_micro = t.micro_batch_size * self.seq_tokens * self.dist.world_size
        self.accum = max(1, round(t.batch_tokens / per_micro))
        self.tokens_per_step = self.accum * per_micro
        self.step = 0
        if tensors is not None:
            ckpt.load_weights(self.model, tensors, str(start or init_from))
        if start is not None:
            ckpt.load_optimizer(self.model, self.optimizer, start)
            self.loader.load_state_dict(self.state["loader"])
            self.step = int(self.state["step"])
            if self.dist.is_main:
                trim_metrics(self.metrics_path, lambda r: r.get("step", 0) <= self.step)  # redone after the kill
        self.forward = self.wrapped
        if t.compile:
            self.forward = _try_compile(self.wrapped)

    @property
    def parallel(self) -> str:
        """What data parallelism actually runs, e.g. "fsdp/nccl x8", or "none"."""
        if not self.dist.enabled:
            return "none"
        import torch.distributed as dist

        return f"{self.cfg.train.parallel}/{dist.get_backend()} x{self.dist.world_size}"

    @property
    def precision(self) -> str:
        return "bf16 autocast" if uses_bf16(self.device, self.cfg.train.dtype) else "fp32"

    def _claim_folder(self, resume: bool, overwrite: bool) -> None:
        """Rank 0 locks the run folder for the whole run (a second writer is refused); a new run
        never starts in a folder holding another run's checkpoints and metrics (keep-last-N
        would delete its own newest checkpoints in favour of the old run's) unless ``overwrite``
        clears it first. Every rank sees the same verdict: the check precedes any write."""
        existing = run_files(self.out)
        if existing and not resume and not overwrite:
            raise ConfigError(f"{self.out} already holds a run ({', '.join(p.name for p in existing[:4])}); "
                              f"pass --resume to continue it, --overwrite to delete it and start again, "
                              f"or choose another --out")
        if self.dist.is_main:
            self._lock.enter_context(dir_lock(self.out, "toto train"))
            if overwrite:
                clear_folder(self.out)
        barrier()

    def close(self) -> None:
        """Release the run folder's lock (``fit`` does it when it returns)."""
        self._lock.close()

    # fields a resume may change: the run's length, logging and placement
    RESUMABLE_CHANGES = {"train": ("max_steps", "eval_interval", "ckpt_interval", "log_interval", "tensorboard",
                                   "device", "keep_checkpoints", "parallel", "compile"),
                         "data": ("path",)}

    @classmethod
    def _merge_resume_config(cls, saved: Config, given: Config) -> Config:
        """Resume with the saved config. ``given`` must agree with it except for
        ``RESUMABLE_CHANGES`` (applied, and recorded in config.json): a changed learning rate,
        batch, model or data split is refused with the fields named, never silently ignored.
        (``toto train --resume`` builds ``given`` on top of the saved config, so only what the
        command line names can differ.)"""
        sections = ("model", "data", "train")
        skip = tuple(f"{s}.{n}" for s, names in cls.RESUMABLE_CHANGES.items() for n in names) + ("train.out_dir",)
        refuse_changed({s: dataclasses.asdict(getattr(saved, s)) for s in sections},
                       {s: dataclasses.asdict(getattr(given, s)) for s in sections}, "--resume: the run", skip,
                       ignore_none=True)  # None: not set (e.g. vocab_size, filled in from the data at the start)
        for section, names in cls.RESUMABLE_CHANGES.items():
            for name in names:
                if section == "data":
                    continue
                setattr(saved.train, name, getattr(given.train, name))
        if given.data.path:
            old, new = data_paths(saved.data), data_paths(given.data)
            if len(old) != len(new):
                raise ConfigError(f"--resume: this run trained on {len(old)} folder(s) ({', '.join(old)}); "
                                  f"data.path now names {len(new)} ({', '.join(new)}); resume with the same "
                                  f"folders or start a new run (--out)")
            saved.data.path = given.data.path  # folders may have moved; _check_same_sources compares them
        return saved

    # -- metrics ---------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _log(self, record: dict, tb) -> None:
        if not self.dist.is_main:
            return
        append_jsonl(self.metrics_path, record)
        if tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, record["step"])

    # -- loop ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean NLL over the held-out sequences; with several folders, each source's own
        ``eval_batches`` are evaluated, kept in ``val_by_source`` and pooled for the total."""
        if len(self.val_idx) == 0:
            return None
        self.model.eval()
        total, count, self.val_by_source = 0.0, 0, {}
        for src, idx in zip(self.sources, self.val_per_source):
            if len(idx) == 0:
                continue
            t, c = self._val_sum(idx)
            total, count = total + t, count + c
            if len(self.sources) > 1:
                self.val_by_source[src["name"]] = t / max(c, 1)
        self.model.train()
        return total / max(count, 1)

    def _val_sum(self, idx) -> tuple[float, float]:
        """(summed NLL, target count) over the fixed val batches of ``idx``, all ranks together.

        Every rank runs the same number of forwards: a rank whose share of ``idx`` is shorter
        (fewer val sequences than ranks, or a remainder) evaluates padding batches that count
        zero. Under FSDP each forward is a collective, so unequal counts would deadlock."""
        t = self.cfg.train
        world = self.dist.world_size
        per_rank = -(-len(idx) // world)  # rank 0's share, the largest
        n_batches = min(t.eval_batches, -(-per_rank // t.micro_batch_size))
        mine = list(val_batches(self.ds, idx, t.micro_batch_size, t.eval_batches, self.dist.rank, world))
        total, count = 0.0, 0
        for b in range(n_batches):
            real = b < len(mine)
            batch = mine[b] if real else next(val_batches(self.ds, idx[:1], 1, 1))
            inputs, targets = shift_targets(batch.to(self.device), self.ds.layout.pad)
            with autocast_for(self.device, t.dtype):
                _, loss = self.model(inputs, targets)
            if real:
                n = int((targets != -1).sum())
                total, count = total + float(loss) * n, count + n
        total, count = all_reduce_sum([total, count], self.device)
        return total, count

    def _sync_grads(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        if self.cfg.train.parallel == "ddp":
            return contextlib.nullcontext() if last else self.wrapped.no_sync()
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self) -> tuple[float, float]:
        t = self.cfg.train
        set_lr(self.optimizer, self.step, t.max_steps, t.warmup_steps, t.min_lr_ratio, t.lr)
        total = torch.zeros((), device=self.device)
        for i in range(self.accum):
            batch = self.loader.next_batch().to(self.device, non_blocking=True)
            inputs, targets = shift_targets(batch, self.ds.layout.pad)
            with self._sync_grads(i == self.accum - 1):
                with autocast_for(self.device, t.dtype):
                    _, loss = self.forward(inputs, targets)
                (loss / self.accum).backward()
            total += loss.detach() / self.accum
        # one host sync per optimizer step; the logged loss is the mean over ranks, and a stop
        # signal seen by any rank stops them all at this same step
        total, stops = all_reduce_sum([float(total), float(bool(self._signals.received))], self.device)
        total /= self.dist.world_size
        self.stop_requested = stops > 0
        if not math.isfinite(total):
            raise TrainingError(f"loss became {total} at step {self.step}; lower train.lr or check the "
                                f"data (last checkpoint: {ckpt.latest_checkpoint(self.out)})")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, float(grad_norm)

    def save(self) -> Path:
        """Collective: every rank gathers, rank 0 writes."""
        model_sd, optim_sd = ckpt.gather_state(self.model, self.optimizer)
        path = self.out / ckpt.CKPT_DIR / f"step_{self.step:08d}"
        if self.dist.is_main:
            state = {"tokens": self.state["tokens"], "loader": self.loader.state_dict(),
                     "vocab": self.ds.layout.to_dict(), "grid": list(self.ds.geometry.grid),
                     "frames_per_sequence": self.ds.geometry.frames_per_sequence,
                     "tokenizer": self.ds.index.get("tokenizer", {}), "world_size": self.dist.world_size,
                     "data_sources": self.sources}
            if "init_from" in self.state:
                state["init_from"] = self.state["init_from"]
            path = ckpt.save_checkpoint(self.out, self.step, model_sd, self.cfg, state, optim_sd,
                                        keep=self.cfg.train.keep_checkpoints)
        barrier()
        return path

    def fit(self, until: int | None = None) -> RunSummary:
        """Train to ``train.max_steps`` (or stop early at step ``until``, with a checkpoint there;
        the schedule still follows max_steps, so a later ``--resume`` continues seamlessly)."""
        t = self.cfg.train
        stop = min(until or t.max_steps, t.max_steps)
        tb = None
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "config.json", self.cfg.to_dict())
            tb = _tensorboard(self.out) if t.tensorboard else None
        uniform = math.log(self.ds.layout.vocab_size)
        self.model.train()
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        loss, val = self._last_logged("loss"), self._last_logged("val_loss")  # a finished run resumed
        last_ckpt = ckpt.latest_checkpoint(self.out)
        tic = time.perf_counter()
        self._signals = StopSignals()
        try:
            while self.step < stop:
                if self.stop_requested:
                    raise StopRequested(self._signals.received or "a signal on another rank")
                loss, gnorm = self.train_step()
                self.step += 1
                self.state["tokens"] += self.tokens_per_step
                toc = time.perf_counter()
                tok_s = self.tokens_per_step / max(toc - tic, 1e-9)
                tic = toc
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.step % t.log_interval == 0 or self.step == t.max_steps:
                    self._log({"step": self.step, "loss": loss, "lr": cosine_lr(self.step - 1, t.max_steps, t.warmup_steps, t.lr, t.min_lr_ratio),
                               "grad_norm": gnorm, "tokens": self.state["tokens"], "tok_per_s": tok_s}, tb)
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    val = self.evaluate()
                    if val is not None:
                        self._log({"step": self.step, "val_loss": val,
                                   **{f"val_loss/{k}": v for k, v in self.val_by_source.items()}}, tb)
                        if self.progress:
                            bar.write(f"step {self.step}: train {loss:.4f}  val {val:.4f}  "
                                      f"(uniform {uniform:.4f})")
                if self.step % t.ckpt_interval == 0 or self.step == stop:
                    last_ckpt = self.save()
        except StopRequested as e:
            bar.write(f"{e} at step {self.step}; saving a checkpoint to resume from")
            self.save()
            raise
        finally:
            self._signals.restore()
            bar.close()
            if tb is not None:
                tb.close()
        summary = RunSummary(self.step, self.state["tokens"], loss, val, uniform, str(last_ckpt), self.parallel,
                             self.sources)
        if self.dist.is_main:
            atomic_write_json(self.out / "summary.json", summary.__dict__)
        self.close()
        return summary

    def _last_logged(self, key: str) -> float | None:
        values = [r[key] for r in read_jsonl(self.metrics_path) if key in r] if self.dist.is_main else []
        return values[-1] if values else None


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the trainer finished its step, saved, and stops."""


class StopSignals:
    """SIGINT and SIGTERM (what Slurm and Kubernetes send before killing a job) only set a flag;
    the loop checks it between optimizer steps, so the checkpoint it then writes is a consistent
    step (weights, optimizer and loader position agree) and arrives within one step. A second
    signal stops at once, as the default handlers would."""

    def __init__(self, install: bool = True):
        import signal
        import threading

        self.received: str = ""
        self._old = {}
        if not install or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _check_same_sources(saved: list[dict], now: list[dict]) -> None:
    """--resume must see the folders (by name and size) and weights the run started with."""
    def key(srcs):
        return [(s["name"], s["n_sequences"], round(s["weight"], 12)) for s in srcs]

    def fmt(srcs):
        return ", ".join(f"{s['name']} ({s['n_sequences']} seq, weight {s['weight']:.3g})" for s in srcs)

    if key(saved) != key(now):
        raise ConfigError(f"--resume: this run trained on {fmt(saved)}; data.path/data.weights now give "
                          f"{fmt(now)}; resume with the same folders and weights or start a new run (--out)")


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(out / "tb"))


def _try_compile(model):
    """torch.compile compiles lazily, so an unusable backend (e.g. no C++ compiler for inductor
    on CPU) only fails at the first call: fall back to eager there, once."""
    try:
        compiled = torch.compile(model)
    except Exception as e:  # compile support varies by platform; training still works without it
        print(f"torch.compile unavailable ({e}); running eagerly")
        return model
    use = [compiled]

    def forward(*args, **kwargs):
        if use[0] is compiled:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:
                print(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0]}); running eagerly")
                use[0] = model
        return model(*args, **kwargs)

    return forward
