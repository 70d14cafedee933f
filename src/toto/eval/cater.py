"""CATER snitch localisation metrics (CATER's task 3; the paper's object-permanence test, arXiv
2501.05453 Sec. 4): top-1, top-5 and the mean L1 distance in grid cells between the predicted and
the true cell, overall and split by whether a cone hides the snitch at the last frame (only the
hidden case needs permanence), and the "last place seen" oracle that needs no reasoning at all.
"""

from __future__ import annotations

import numpy as np

from ..data.cater import CLASSES, GRID


def _block(rank: np.ndarray, labels: np.ndarray) -> dict:
    """``rank (N, k)``: classes best first (k >= 1) -> n, top1, top5 (None for fewer than 5
    guesses), l1 (of the first guess, in cells)."""
    if len(labels) == 0:
        return {"n": 0, "top1": None, "top5": None, "l1": None}
    first = rank[:, 0]
    l1 = np.abs(first // GRID - labels // GRID) + np.abs(first % GRID - labels % GRID)
    return {"n": int(len(labels)), "top1": float((first == labels).mean()),
            "top5": float((rank[:, :5] == labels[:, None]).any(1).mean()) if rank.shape[1] >= 5 else None,
            "l1": float(l1.mean())}


def localization_metrics(scores_or_guesses, labels, hidden=None) -> dict:
    """``scores (N, 36)`` (logits or probabilities) or ``guesses (N,)`` (one cell each) against
    ``labels (N,)``; with ``hidden (N,)`` bools (None where unknown) also the hidden / visible
    splits."""
    x = np.asarray(scores_or_guesses)
    labels = np.asarray(labels, dtype=np.int64)
    if x.ndim == 2:
        if x.shape[1] != CLASSES:
            raise ValueError(f"expected {CLASSES} class scores per video, got {x.shape[1]}")
        rank = np.argsort(-x, axis=1, kind="stable")
    else:
        rank = x.astype(np.int64)[:, None]
    out = {"all": _block(rank, labels)}
    if hidden is not None:
        h = np.array([v is True for v in hidden])
        v = np.array([v is False for v in hidden])
        out["hidden"] = _block(rank[h], labels[h])
        out["visible"] = _block(rank[v], labels[v])
    return out


def oracle_metrics(videos: list[dict]) -> dict:
    """The "last place the snitch was seen" guess of each video (``toto lists cater``'s
    ``cater.json`` entries with ``label``, ``hidden``, ``last_seen_cell``)."""
    known = [v for v in videos if "last_seen_cell" in v]
    return localization_metrics([v["last_seen_cell"] for v in known], [v["label"] for v in known],
                                [v["hidden"] for v in known])


def format_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per method, top-1 / top-5 / L1 overall, on hidden and on visible clips."""
    head = ("| method | n | top-1 | top-5 | L1 | hidden: n | top-1 | top-5 | L1 | visible: n | top-1 | top-5 | L1 |\n"
            "|---|" + "---|" * 12 + "\n")

    def cells(b):
        if not b or not b["n"]:
            return ["0", "-", "-", "-"]
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        return [str(b["n"]), pct(b["top1"]), pct(b["top5"]), f"{b['l1']:.2f}"]

    lines = [f"| {name} | " + " | ".join(cells(m["all"]) + cells(m.get("hidden")) + cells(m.get("visible"))) + " |"
             for name, m in rows.items()]
    return head + "\n".join(lines) + "\n"


# -- the evaluation: frozen probe and fine-tuning (CE + next-token loss) vs random init vs oracle --

def random_init_checkpoint(src, out_dir) -> "Path":
    """A step-0 checkpoint of ``src``'s architecture with the one loader's random-init weights
    (toto.eval.backbone.random_init), so the baseline runs through exactly the same code as the
    trained model."""
    from ..train.checkpoint import latest_checkpoint, read_checkpoint, save_checkpoint
    from .backbone import random_init

    done = latest_checkpoint(out_dir)
    if done is not None:
        return done
    cfg, state, _ = read_checkpoint(src)
    return save_checkpoint(out_dir, 0, random_init(cfg), cfg, {**state, "step": 0}, keep=1)


def scores_by_cell(pred) -> tuple[np.ndarray, np.ndarray]:
    """A ``val_predictions.npz`` -> ``(scores (N, 36), labels (N,))`` indexed by grid cell (the
    probe's classes are the label texts present in train, in sorted order)."""
    cells = np.array([int(c) for c in pred["classes"]])
    scores = np.full((len(pred["logits"]), CLASSES), -np.inf, dtype=np.float64)
    scores[:, cells] = pred["logits"]
    return scores, cells[pred["labels"]]


def frozen_probe(ckpt, tokenizer: str, data, out, frames: int, stride: int, layer: int | None, epochs: int,
                 batch_size: int, device: str, progress: bool) -> int:
    """An attentive probe on one layer of the frozen model (features cached once, as toto probe
    does); writes ``out/val_predictions.npz`` like toto finetune and returns the layer."""
    from pathlib import Path

    from ..device import resolve_device
    from .backbone import load_backbone
    from .features import FeatureExtractor, SequenceSpec, scan_dataset
    from .finetune import write_predictions
    from ..tasks.base import Split, predict
    from .probe import ProbeConfig, probe_key, train_probe

    out = Path(out)
    dev = resolve_device(device)
    ds = scan_dataset(data)
    spec = SequenceSpec(ds.kind, frames, stride, "last")
    bb = load_backbone(ckpt, tokenizer, spec, dev)
    cfg = bb.cfg
    layer = bb.check_layers([cfg.model.n_layers // 2 if layer is None else layer])[0]
    ident = {"model": {"checkpoint": bb.identity["checkpoint"]}, "tokenizer": bb.tok_id}
    feats, _ = FeatureExtractor(bb.model, bb.layout, bb.tokenizer, spec, [layer], ident, dev, batch_size=batch_size,
                                progress=progress).run(ds, out / "features")
    pcfg = ProbeConfig(epochs=epochs)
    val = Split(feats["val"].labels.numpy(), features={0: feats["val"].layer(layer)})
    _, probe = train_probe(feats["train"].layer(layer), feats["train"].labels, val.features[0], val.targets,
                           len(ds.classes), "attentive", pcfg, cfg.model.n_heads, dev)
    logits = predict(probe, val, pcfg.batch_size, dev)[0][probe_key(0, "attentive")]
    paths = [str(ds.splits["val"][int(i)].path) for i in feats["val"].samples()]
    write_predictions(out / "val_predictions.npz", logits, feats["val"].labels.numpy(), paths, ds.classes)
    return layer


def run_eval(checkpoint: str, tokenizer: str, data: str, out, frames: int = 16, stride: int = 2,
             layer: int | None = None, probe_epochs: int = 10, finetune_epochs: int = 3,
             random_init: bool = True, batch_size: int = 8, device: str = "auto", progress: bool = True,
             finetune_cfg: dict | None = None) -> dict:
    """Frozen attentive probe (features cached once, as toto probe) and fine-tuning (CE +
    next-token loss) of ``checkpoint`` and, with ``random_init``, of the same architecture at
    random init, on the last ``frames`` frames of each video of ``data`` (``toto lists cater``'s
    folder); the oracle from its ``cater.json``. Writes ``out/results.json`` and ``results.md``;
    each run resumes from its own checkpoints."""
    import json
    from pathlib import Path

    from ..ioutil import atomic_write_bytes, atomic_write_json
    from ..train.checkpoint import latest_checkpoint, resolve_checkpoint
    from .finetune import FinetuneConfig, FinetuneJob

    out, data = Path(out), Path(data)
    meta_path = data / "cater.json"
    if not meta_path.is_file():
        from ..errors import DataError

        raise DataError(f"{data}: no cater.json; make the folder with toto lists cater")
    videos = {Path(k).name: v for k, v in json.loads(meta_path.read_text())["videos"].items()}
    models = {"trained": resolve_checkpoint(checkpoint)}
    if random_init:
        models["random_init"] = random_init_checkpoint(models["trained"], out / "random_init_model")
    rows, report = {}, {"data": str(data), "frames": frames, "stride": stride, "clip": "last", "runs": {}}
    val_names = None
    for name, ckpt in models.items():
        for mode, epochs in (("frozen", probe_epochs), ("finetuned", finetune_epochs)):
            if epochs <= 0:
                continue
            d = out / f"{name}_{mode}"
            if mode == "frozen":
                used = frozen_probe(ckpt, tokenizer, data, d, frames, stride, layer, epochs, batch_size, device,
                                    progress)
            else:
                cfg = FinetuneConfig(**{**(finetune_cfg or {}), "epochs": epochs, "layer": layer,
                                        "batch_size": batch_size})
                job = FinetuneJob(str(ckpt), tokenizer, str(data), d, cfg, cache=str(out / "tokens"),
                                  device=device, frames=frames, stride=stride, clip="last", progress=progress,
                                  resume=latest_checkpoint(d) is not None)
                used = job.run()["finetune"]["layer"]
            pred = np.load(d / "val_predictions.npz")
            scores, labels = scores_by_cell(pred)
            names = [Path(p).name for p in pred["paths"]]
            val_names = names
            m = localization_metrics(scores, labels, [videos.get(n, {}).get("hidden") for n in names])
            rows[f"{name}, {mode}"] = m
            report["runs"][f"{name}_{mode}"] = {"metrics": m, "layer": used, "epochs": epochs,
                                                "checkpoint": str(ckpt)}
    if val_names is not None and any("last_seen_cell" in videos.get(n, {}) for n in val_names):
        rows["oracle: last place seen"] = report["oracle"] = oracle_metrics([videos[n] for n in val_names
                                                                             if n in videos])
    report["table"] = format_table(rows)
    atomic_write_json(out / "results.json", report)
    atomic_write_bytes(out / "results.md", report["table"].encode())
    return report
