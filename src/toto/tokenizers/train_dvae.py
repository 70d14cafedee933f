"""Train our own DALL-E-style dVAE on frames, for users without the official weights.

The recipe follows the DALL-E paper (Ramesh et al. 2021, appendix A), shrunk to fit a CPU:

- the encoder's logits define a categorical posterior per grid cell; the decoder sees a
  Gumbel-softmax sample ``softmax((logits + g) / tau)`` whose temperature ``tau`` anneals
  exponentially from ``tau_start`` to ``tau_end`` over ``anneal_frac`` of the steps;
- reconstruction: the negative log-likelihood of the mapped pixels (``map_pixels``) under the
  decoder's logit-Laplace distribution, location = first 3 maps, log-scale = last 3;
- KL from the posterior to a uniform prior, weighted by ``kl_weight`` that ramps linearly from 0
  over ``kl_warmup_frac`` of the steps.  Both terms are per image, divided by the number of
  sub-pixels (an ELBO in nats per sub-pixel), so ``kl_weight`` means the same at any resolution;
- Adam with a cosine learning-rate decay to ``lr * lr_final_frac``.

Evaluation on held-out frames uses the tokenizer itself (argmax codes, decoder mean), so the
reported PSNR is what ``toto tokenize`` + ``toto detokenize`` would give.

Files, for ``out = dvae.safetensors``::

    dvae.safetensors             the tokenizer (written at the end)
    dvae.report.json             the report this function returns
    dvae.samples.png             held-out frames (top) over their reconstructions (bottom)
    dvae.train/ckpt/             the latest checkpoint (weights, Adam state, RNG, step), atomic
    dvae.train/metrics.jsonl     one line per logged step
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..commands.argtypes import nonnegative_float, positive_float, positive_int
from ..config import DEVICE_HELP, option
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from ..ioutil import append_jsonl, atomic_dir, atomic_write_bytes, atomic_write_json
from ..jobstate import refuse_changed, trim_metrics
from ..train.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from ..train.optim import cosine_lr
from .dvae import LOGIT_LAPLACE_EPS, Decoder, DVAEConfig, DVAETokenizer, Encoder, frames_to_input, load_state
from .stats import codebook_usage, mse_to_psnr, psnr


@dataclass
class DVAETrainConfig:
    # architecture (see DVAEConfig); the defaults are a tiny dVAE that trains on a CPU in minutes
    vocab_size: int = 512
    n_hid: int = option(32, "width of the first group (DALL-E: 256; default 32)", type=positive_int)
    n_blk_per_group: int = option(1, "residual blocks per group (DALL-E: 2; default 1)", flag="--blocks",
                                  type=positive_int)
    group_count: int = option(4, "groups; downsampling is 2**(groups-1) (DALL-E: 4, i.e. 8x; default 4)",
                              flag="--groups", type=positive_int)
    n_init: int = 64
    resolution: int = 64
    # optimisation
    steps: int = option(2000, "optimizer steps", type=positive_int)
    batch_size: int = option(16, "frames per step", flag="--batch", type=positive_int)
    lr: float = option(2e-3, "peak learning rate", type=positive_float)
    lr_final_frac: float = 0.1
    weight_decay: float = 0.0
    # relaxation and prior
    tau_start: float = 1.0
    tau_end: float = 1 / 16
    anneal_frac: float = 0.8
    # DALL-E's value; raised codebook usage 3.7% -> 21% in our 64 px CPU run
    kl_weight: float = option(6.6, "final KL weight (default 6.6, as DALL-E)", type=nonnegative_float)
    kl_warmup_frac: float = 0.2
    # bookkeeping
    val_frac: float = 0.1
    flip: bool = True  # random horizontal flips of training frames
    seed: int = 0
    device: str = option("auto", DEVICE_HELP)
    log_every: int = 25
    ckpt_every: int = 200
    n_samples: int = 8  # frames shown in the sample grid

    def validate(self) -> "DVAETrainConfig":
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dvae train {name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "tau_start", "tau_end"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"dvae train {name} must be > 0, got {getattr(self, name)}")
        for name in ("lr_final_frac", "anneal_frac", "kl_warmup_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"dvae train {name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0 < self.val_frac < 1:
            raise ConfigError(f"dvae train val_frac must lie in (0, 1), got {self.val_frac}")
        if self.kl_weight < 0:
            raise ConfigError(f"dvae train kl_weight must be >= 0, got {self.kl_weight}")
        self.model_config()  # validates the architecture
        return self

    def model_config(self) -> DVAEConfig:
        return DVAEConfig(vocab_size=self.vocab_size, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                          group_count=self.group_count, n_init=self.n_init, resolution=self.resolution).validate()

    @classmethod
    def from_dict(cls, d: dict) -> "DVAETrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown dvae train option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# -- schedules and losses ------------------------------------------------------------------
def temperature(cfg: DVAETrainConfig, step: int) -> float:
    """Exponential decay from tau_start to tau_end over anneal_frac of the run, then constant."""
    t = min(1.0, step / max(1.0, cfg.anneal_frac * cfg.steps))
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** t


def kl_weight(cfg: DVAETrainConfig, step: int) -> float:
    ramp = cfg.kl_warmup_frac * cfg.steps
    return cfg.kl_weight * (1.0 if ramp <= 0 else min(1.0, step / ramp))


def learning_rate(cfg: DVAETrainConfig, step: int) -> float:
    """The shared cosine schedule without warm-up, down to ``lr * lr_final_frac``."""
    return cosine_lr(step, cfg.steps, 0, cfg.lr, cfg.lr_final_frac)


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Mean NLL (nats per sub-pixel) of mapped pixels ``x: (N, C, H, W)`` in (eps, 1-eps) under the
    logit-Laplace with location ``mu = stats[:, :C]`` and log-scale ``stats[:, C:]``:
    ``p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x))``."""
    c = x.shape[1]
    mu, log_b = stats[:, :c].float(), stats[:, c:2 * c].float().clamp(-7.0, 7.0)
    logit_x = torch.log(x) - torch.log1p(-x)
    nll = (logit_x - mu).abs() * torch.exp(-log_b) + log_b + math.log(2.0) + torch.log(x) + torch.log1p(-x)
    return nll.mean()


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q || uniform) summed over grid cells, mean over images; ``logits: (N, K, h, w)``."""
    logq = F.log_softmax(logits.float(), dim=1)
    kl = (logq.exp() * logq).sum(1) + math.log(logits.shape[1])  # (N, h, w)
    return kl.sum((1, 2)).mean()


def save_sample_grid(path: Path, originals: np.ndarray, recons: np.ndarray) -> None:
    """Two rows: ``originals: (n, H, W, 3)`` over ``recons``, 2-pixel white gutters; PNG."""
    from io import BytesIO

    from PIL import Image

    n, h, w, _ = originals.shape
    g = 2
    grid = np.full((2 * h + 3 * g, n * w + (n + 1) * g, 3), 255, np.uint8)
    for i in range(n):
        x = g + i * (w + g)
        grid[g:g + h, x:x + w] = originals[i]
        grid[2 * g + h:2 * g + 2 * h, x:x + w] = recons[i]
    buf = BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


# -- training ------------------------------------------------------------------------------
def _paths(out_path: Path) -> dict[str, Path]:
    stem = out_path.with_suffix("") if out_path.suffix == ".safetensors" else out_path
    run = stem.parent / (stem.name + ".train")
    return {"run": run, "ckpt": run / "ckpt", "metrics": run / "metrics.jsonl",
            "report": stem.parent / (stem.name + ".report.json"),
            "samples": stem.parent / (stem.name + ".samples.png")}


def _frames_fingerprint(frames: np.ndarray) -> str:
    h = hashlib.sha256(repr(frames.shape).encode())
    h.update(np.ascontiguousarray(frames[:: max(1, len(frames) // 64)]).tobytes())
    return h.hexdigest()[:16]


def _split(n: int, cfg: DVAETrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split; at least one frame on each side."""
    if n < 2:
        raise DataError(f"need at least 2 frames to train a dVAE (one held out), got {n}")
    perm = np.random.default_rng(cfg.seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * cfg.val_frac)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _save_ckpt(paths, step, enc, dec, opt, gens, cfg, fp) -> None:
    from safetensors.torch import save_file

    weights = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in enc.state_dict().items()}
    weights.update({f"decoder.{k}": v.detach().contiguous().cpu() for k, v in dec.state_dict().items()})
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    tensors["rng"], tensors["rng_noise"] = gens[0].get_state(), gens[1].get_state()
    with atomic_dir(paths["ckpt"]) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {"step": step, "config": asdict(cfg), "frames": fp, "optimizer": meta})


def _load_ckpt(paths, enc, dec, opt, gens, cfg, fp) -> int:
    from safetensors.torch import load_file

    d = paths["ckpt"]
    try:
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "model.safetensors"))
        tensors = load_file(str(d / "optimizer.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{d}: unreadable dVAE checkpoint ({e}); delete it to start over") from None
    refuse_changed(state["config"], asdict(cfg), f"{d} (delete {paths['run']} to start over)")
    if state["frames"] != fp:
        raise CheckpointError(f"{d}: checkpoint was made on different frames; use the same media, "
                              f"another --out, or delete {paths['run']} to start over")
    load_state(enc, {k[8:]: v for k, v in weights.items() if k.startswith("encoder.")}, f"{d} (encoder)")
    load_state(dec, {k[8:]: v for k, v in weights.items() if k.startswith("decoder.")}, f"{d} (decoder)")
    gens[0].set_state(tensors.pop("rng"))
    gens[1].set_state(tensors.pop("rng_noise"))
    opt.load_state_dict(optimizer_from_tensors(tensors, state["optimizer"]))
    return int(state["step"])


def evaluate(tok: DVAETokenizer, frames: np.ndarray) -> tuple[dict, np.ndarray]:
    """Held-out codebook usage and PSNR through the tokenizer's own encode/decode."""
    codes = tok.encode(frames)
    recon = tok.decode(codes)
    return {"psnr": psnr(frames, recon, per_frame=True), **codebook_usage(codes, tok.n_codes)}, recon


def train_dvae(frames: np.ndarray, cfg: DVAETrainConfig, out_path: str | Path, progress: bool = True,
               resume: bool = True) -> tuple[DVAETokenizer, dict]:
    """``frames: (N, R, R, 3) uint8`` with R = cfg.resolution -> (tokenizer, report).

    A checkpoint is written every ``ckpt_every`` steps; calling again with the same frames,
    config and ``out_path`` continues from it (``resume=False`` starts over)."""
    cfg.validate()
    mcfg = cfg.model_config()
    out_path = Path(out_path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(f"training frames: expected (N, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    if frames.shape[1:3] != (cfg.resolution, cfg.resolution):
        raise DataError(f"training frames are {frames.shape[1]}x{frames.shape[2]}, but the dVAE resolution is "
                        f"{cfg.resolution} (resize/crop the frames, or set the resolution)")
    device = resolve_device(cfg.device)
    paths = _paths(out_path)
    paths["run"].mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = _split(len(frames), cfg)
    fp = _frames_fingerprint(frames)

    torch.manual_seed(cfg.seed)
    enc, dec = Encoder(mcfg).to(device), Decoder(mcfg).to(device)
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)  # batches and flips
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # Gumbel noise, made where it is used
    grid = (cfg.resolution // mcfg.downsample,) * 2
    step = 0
    if resume and (paths["ckpt"] / "state.json").is_file():
        step = _load_ckpt(paths, enc, dec, opt, (gen, noise), cfg, fp)
        trim_metrics(paths["metrics"], lambda r: r["step"] <= step)  # logged after the checkpoint: redone
    elif paths["metrics"].exists():
        paths["metrics"].unlink()  # a fresh run: drop the old curve

    train_frames = torch.from_numpy(frames[train_idx])  # stays uint8 on the CPU until batched
    n_sub = 3 * cfg.resolution ** 2
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="dvae", unit="step")
    t0, t_last, s_last = time.time(), time.time(), step
    enc.train(), dec.train()
    while step < cfg.steps:
        idx = torch.randint(len(train_frames), (cfg.batch_size,), generator=gen)
        batch = train_frames[idx]
        if cfg.flip:
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(2), batch)
        u = torch.rand(cfg.batch_size, cfg.vocab_size, *grid, generator=noise, device=device)
        gumbel = -torch.log(-torch.log(u.clamp_(1e-10, 1 - 1e-7)))
        x = frames_to_input(batch.to(device))
        tau, beta, lr = temperature(cfg, step), kl_weight(cfg, step), learning_rate(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = enc(x)
        z = F.softmax((logits + gumbel) / tau, dim=1)
        stats = dec(z)
        rec = logit_laplace_nll(x, stats)
        kl = kl_to_uniform(logits) / n_sub
        loss = rec + beta * kl
        if not torch.isfinite(loss):
            raise TrainingError(f"dVAE loss became {loss.item()} at step {step} (lr {lr:.2e}, tau {tau:.3f}); "
                                f"lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            now = time.time()
            with torch.no_grad():  # PSNR of the soft reconstruction, on the [0, 1] pixel scale
                mse = F.mse_loss(torch.sigmoid(stats[:, :3].float()), x).item() / (1 - 2 * LOGIT_LAPLACE_EPS) ** 2
            rec_psnr = mse_to_psnr(mse, 1.0)
            rec_line = {"step": step, "loss": loss.item(), "nll": rec.item(), "kl": kl.item() * n_sub,
                        "tau": tau, "kl_weight": beta, "lr": lr, "train_psnr_soft": rec_psnr,
                        "steps_per_s": (step - s_last) / max(now - t_last, 1e-9)}
            append_jsonl(paths["metrics"], rec_line)
            bar.set_postfix(loss=f"{loss.item():.3f}", psnr=f"{rec_psnr:.1f}", tau=f"{tau:.2f}")
            t_last, s_last = now, step
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _save_ckpt(paths, step, enc, dec, opt, (gen, noise), cfg, fp)
    bar.close()

    tok = DVAETokenizer(mcfg, enc.cpu(), dec.cpu(), device=device, source=f"trained by toto ({cfg.steps} steps)")
    val = frames[val_idx]
    metrics, recon = evaluate(tok, val)
    train_metrics, _ = evaluate(tok, frames[train_idx[: max(len(val_idx), 64)]])
    tok.save(out_path)
    n = min(cfg.n_samples, len(val))
    save_sample_grid(paths["samples"], val[:n], recon[:n])
    report = {"tokenizer": str(out_path), "identity": tok.identity(), "config": asdict(cfg),
              "frames": {"train": len(train_idx), "held_out": len(val_idx), "resolution": cfg.resolution},
              "held_out": metrics, "train_subset": train_metrics,
              "samples_png": str(paths["samples"]), "report_json": str(paths["report"]), "metrics_jsonl": str(paths["metrics"]),
              "seconds_this_call": round(time.time() - t0, 2)}
    atomic_write_json(paths["report"], report)
    return tok, report

