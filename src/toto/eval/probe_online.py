"""Online probing (``toto probe --online``): the probes of every requested layer, pooling and
model trained together from one frozen forward pass per batch, over cached token sequences
instead of cached features.

    token cache (toto.eval.finetune.tokenize_splits): (N, L) uint16 per split, [start] + codes + [end]
      -> a batch of ids (B, L - 1): the end token dropped, as the cached path feeds them
      -> per model (trained, random init): one no-grad forward up to the deepest requested layer
         (Toto.layer_stream; bf16 autocast on GPU)
      -> at each requested layer: code_features (B, T, D) float16, the cached path's features
      -> one AdamW step for each probe (pooling) of that layer, before the next block runs

Why: a feature cache holds N x T x D x 2 bytes per layer (ImageNet at 16x16 tokens, width 768:
500 GB a layer); the token cache N x L x 2 bytes (660 MB). Memory holds the model, the token
arrays, one layer's features of one batch, and the probes.

Same numbers as the cached path: each probe is drawn by ``make_probe`` (seeded), follows
``probe_schedule`` and the cached batch order (epoch e's order is the e-th ``torch.randperm`` of
a generator seeded with ``cfg.seed``), and is scored the same way: val after the last epoch,
train top-1 by one eval pass over the train split at the end. A sample's features from a
batched forward differ from the cached ones by float rounding only.

Val is also scored after every epoch (``metrics.jsonl``); then the state of every probe
(weights, BatchNorm statistics, AdamW moments, last loss) and the epoch go to
``OUT/online_state/epoch_<e>/`` (written under a temporary name, renamed when complete, then
named by ``OUT/online_state/latest``). Resuming replays the first e batch orders.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, ConfigError
from ..ioutil import (append_jsonl, atomic_replace_dir, atomic_write_bytes, atomic_write_json, fresh_tmp_dir,
                      read_jsonl)
from .features import code_features
from .probe import ProbeConfig, ProbeResult, cosine_lr, make_probe, probe_schedule, probe_step, set_best, topk_hits

STATE_DIR = "online_state"


def layer_features(model, tokens: torch.Tensor, layers: list[int], device: torch.device, dtype: str = "auto"):
    """Yield ``(layer, feats: (B, T, D) float16)`` for the sorted ``layers`` from one no-grad
    forward of ``tokens: (B, 1 + T)`` that stops at the deepest. Gradients are back on between
    yields, so the caller trains a layer's probes before the next block runs."""
    from ..train.trainer import autocast_for

    want, deepest = set(layers), max(layers)
    blocks = model.layer_stream(tokens, deepest)
    for i in range(deepest + 1):
        with torch.no_grad(), autocast_for(device, dtype):
            x = next(blocks)  # (B, 1 + T, D): layer i's residual stream
        if i in want:
            yield i, code_features(x)


def _key(model: str, layer: int, pooling: str) -> str:
    return f"{model}/{layer}/{pooling}"


def _forward_all(models: dict, probes: dict, tokens: torch.Tensor, layers: list[int], poolings: list[str],
                 device: torch.device, fn) -> None:
    """One forward of each model over ``tokens: (B, L)`` ([start] + codes + [end]); ``fn(key,
    probe, opt, feats)`` for every probe at its layer."""
    inputs = tokens[:, :-1]  # (B, 1 + T): the end token is not fed, as in the cached path
    for name, (model, _) in models.items():
        for layer, x in layer_features(model, inputs, layers, device):
            for pooling in poolings:
                key = _key(name, layer, pooling)
                fn(key, *probes[key], x)


def _score(models: dict, probes: dict, split, layers, poolings, bs: int, ks: tuple[int, ...], device,
           progress: bool, desc: str) -> dict[str, dict[str, float]]:
    """``{key: {"top<k>": accuracy}}`` of every probe on a split, probes in eval mode: one
    forward per batch and model; the accuracy is ``topk_accuracy``'s over the whole split."""
    from .finetune import _batch

    hits = {key: {k: [] for k in ks} for key in probes}

    def record(key, probe, opt, x):
        logits = probe(x).float().cpu()  # (B, C)
        for k in ks:
            hits[key][k].append(topk_hits(logits, y, k))

    for probe, _ in probes.values():
        probe.eval()
    n = len(split.labels)
    with torch.no_grad():
        for s in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=not progress, leave=False,
                      dynamic_ncols=True):
            tokens, y = _batch(split, np.arange(s, min(s + bs, n)), device)
            y = y.cpu()
            _forward_all(models, probes, tokens, layers, poolings, device, record)
    for probe, _ in probes.values():
        probe.train()
    return {key: {f"top{k}": float(torch.cat(h[k]).float().mean()) for k in ks} for key, h in hits.items()}


# -- state after each epoch --------------------------------------------------------------------

def _save_state(root: Path, epoch: int, step: int, probes: dict, last_loss: dict, val: dict, run_id: dict) -> Path:
    from safetensors.torch import save_file

    from ..train.checkpoint import optimizer_to_tensors

    name = f"epoch_{epoch:04d}"
    tmp = fresh_tmp_dir(root / name)
    weights, moments, groups = {}, {}, {}
    for key, (probe, opt) in probes.items():
        weights.update({f"{key}/{k}": v.detach().contiguous().cpu() for k, v in probe.state_dict().items()})
        tensors, meta = optimizer_to_tensors(opt.state_dict())
        moments.update({f"{key}/{k}": v for k, v in tensors.items()})
        groups[key] = meta["param_groups"]
    save_file(weights, str(tmp / "probes.safetensors"))
    save_file(moments, str(tmp / "optimizer.safetensors"))
    atomic_write_json(tmp / "state.json", {
        "epoch": epoch, "step": step, "run": run_id, "final_loss": {k: float(v) for k, v in last_loss.items()},
        "val": val, "param_groups": groups,
        "batch_order": "epoch e: the e-th torch.randperm(n_train) of torch.Generator().manual_seed(seed)"})
    atomic_replace_dir(tmp, root / name)
    atomic_write_bytes(root / "latest", name.encode())
    for old in root.glob("epoch_*"):
        if old.name != name:
            shutil.rmtree(old)
    return root / name


def _latest_state(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; remove {root} "
                              f"to start over")
    return path


def _differ(a: dict, b: dict) -> list[str]:
    """Dotted names of the (nested) entries where ``a`` and ``b`` differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{k}.{s}" for s in _differ(x, y)]
        elif x != y:
            out.append(k)
    return out


def _load_state(path: Path, probes: dict, run_id: dict) -> dict:
    from safetensors.torch import load_file

    from ..train.checkpoint import optimizer_from_tensors

    state = json.loads((path / "state.json").read_text())
    if state.get("run") != run_id:
        raise ConfigError(f"--resume: {path.parent.parent} was started with other settings "
                          f"({', '.join(_differ(state.get('run') or {}, run_id))} differ); rerun with the original "
                          f"ones or choose another --out")
    try:
        weights = load_file(str(path / "probes.safetensors"))
        moments = load_file(str(path / "optimizer.safetensors"))
        for key, (probe, opt) in probes.items():
            pre = key + "/"
            probe.load_state_dict({k[len(pre):]: v for k, v in weights.items() if k.startswith(pre)})
            opt.load_state_dict(optimizer_from_tensors({k[len(pre):]: v for k, v in moments.items() if k.startswith(pre)},
                                                       {"param_groups": state["param_groups"][key]}))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot restore the online probe state ({e})") from None
    return state


# -- the job -----------------------------------------------------------------------------------

def run_online(job, report: dict, models: dict, *, ds, tokenizer, tok_id: dict, layout, spec, layers: list[int],
               poolings: list[str], cfg: ProbeConfig, default_heads: int, device: torch.device) -> None:
    """Fill ``report["models"]`` as the cached path does (``ProbeJob.run`` writes and plots it)."""
    from .finetune import _batch, tokenize_splits

    out = Path(job.out)
    # the same identity as toto finetune's: one --cache folder serves both commands
    data, cache = tokenize_splits(ds, tokenizer, layout, spec, {"tokenizer": tok_id},
                                  Path(job.cache) if job.cache else out / "tokens", batch_size=job.batch_size,
                                  progress=job.progress)
    train, val = data["train"], data["val"]
    skipped = {s: data[s].skipped for s in data}
    report.update(mode="online", token_cache=str(cache))
    for name in models:
        report["models"][name] = job.model_entry(name, skipped, ds.classes, train.labels, len(val.labels),
                                                 features=None)
    n_train, n_classes = len(train.labels), len(ds.classes)
    ks = (1, 5) if n_classes > 5 else (1,)
    bs, per_epoch, total, warmup = probe_schedule(n_train, cfg)
    probes = {_key(name, layer, pooling): make_probe(model.cfg.dim, n_classes, pooling, cfg, default_heads, device)
              for name, (model, _) in models.items() for layer in layers for pooling in poolings}
    run_id = json.loads(json.dumps({  # what a resumed run must match, as it reads back from JSON
        "models": {name: ident for name, (_, ident) in models.items()}, "token_cache": cache.name,
        "layers": layers, "poolings": poolings, "probe": cfg.to_dict(), "n_train": n_train,
        "n_val": len(val.labels)}))

    state_root, metrics = out / STATE_DIR, out / "metrics.jsonl"
    epoch, step, last_loss, val_scores = 0, 0, {}, {}
    saved = _latest_state(state_root)
    if saved is not None and not job.resume:
        raise ConfigError(f"{out} already holds an online probe run ({saved.name}); pass --resume to continue it "
                          f"or choose another --out")
    if saved is not None:
        state = _load_state(saved, probes, run_id)
        epoch, step, last_loss, val_scores = state["epoch"], state["step"], state["final_loss"], state["val"]
        kept = [r for r in read_jsonl(metrics) if r["epoch"] <= epoch]
        atomic_write_bytes(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
        print(f"resuming {out} after epoch {epoch} of {cfg.epochs}")
    elif metrics.exists():
        metrics.unlink()  # records of a run killed before its first saved state

    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epoch):
        torch.randperm(n_train, generator=gen)  # the batch orders of the epochs already done
    while epoch < cfg.epochs:
        perm = torch.randperm(n_train, generator=gen)
        sums = {key: torch.zeros((), device=device) for key in probes}
        lr = cfg.lr
        tic = time.perf_counter()

        def train_step(key, probe, opt, x):
            loss = probe_step(probe, opt, x, y, lr).detach()
            sums[key] += loss
            last_loss[key] = loss

        for b in tqdm(range(per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                      disable=not job.progress, dynamic_ncols=True):
            tokens, y = _batch(train, perm[b * bs:(b + 1) * bs].numpy(), device)  # (B, L), (B,)
            lr = cosine_lr(step, total, warmup, cfg.lr, cfg.min_lr_ratio)
            _forward_all(models, probes, tokens, layers, poolings, device, train_step)
            step += 1
        epoch += 1
        val_scores = _score(models, probes, val, layers, poolings, bs, ks, device, job.progress, "val")
        append_jsonl(metrics, {"epoch": epoch, "step": step, "lr": lr, "time_s": time.perf_counter() - tic,
                               "train_loss": {k: float(v) / per_epoch for k, v in sums.items()},
                               "val_top1": {k: v["top1"] for k, v in val_scores.items()}})
        _save_state(state_root, epoch, step, probes, last_loss, val_scores, run_id)
        if job.progress:
            best = {name: max((val_scores[_key(name, l, p)]["top1"], l, p) for l in layers for p in poolings)
                    for name in models}
            tqdm.write(f"epoch {epoch}/{cfg.epochs}: best val top-1 " + ", ".join(
                f"{name} {100 * t:.1f}% (layer {l}, {p})" for name, (t, l, p) in best.items()))

    train_scores = _score(models, probes, train, layers, poolings, bs, (1,), device, job.progress, "train top-1")
    for name in models:
        res = report["models"][name]
        for layer in layers:
            res["layers"][str(layer)] = {}
            for pooling in poolings:
                key = _key(name, layer, pooling)
                res["layers"][str(layer)][pooling] = ProbeResult(
                    top1=val_scores[key]["top1"], top5=val_scores[key].get("top5"),
                    train_top1=train_scores[key]["top1"], final_loss=float(last_loss[key])).to_dict()
        set_best(res, poolings)
