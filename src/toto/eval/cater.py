"""CATER snitch localisation metrics (CATER's task 3; the paper's object-permanence test, arXiv
2501.05453 Sec. 4): top-1, top-5 and the mean L1 distance in grid cells between the predicted and
the true cell, overall and split by whether a cone hides the snitch at the last frame (only the
hidden case needs permanence), and the "last place seen" oracle that needs no reasoning at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.cater import CLASSES, GRID
from ..errors import DataError
from ..tasks.classify import ClassifyTask


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


# -- the task and the job: frozen probe and fine-tuning (CE + next-token loss) vs random init vs oracle --


def cell_scores(logits, classes) -> np.ndarray:
    """``logits (N, C)`` over the probe's classes (label texts, i.e. the cells present in train)
    -> ``(N, 36)`` indexed by grid cell, ``-inf`` for a cell the probe cannot name."""
    cells = np.array([int(c) for c in classes])
    scores = np.full((len(logits), CLASSES), -np.inf, dtype=np.float64)
    scores[:, cells] = np.asarray(logits, dtype=np.float64)
    return scores


class CaterTask(ClassifyTask):
    """Snitch localisation on the framework (toto.tasks.base): the classification task's reader
    (``toto lists cater``'s list files -> the window of ``frames`` ending at the last frame ->
    token sequences, class = the cell's label text) and attentive probe, scored by CATER's
    metric: top-1 / top-5 / L1 in cells, overall and on clips whose snitch is hidden or visible
    at the end (``videos``: ``cater.json``'s per-video entries, keyed by file name)."""

    def __init__(self, data, videos: dict[str, dict], frames: int, stride: int, batch_size: int):
        super().__init__(data, {}, frames=frames, stride=stride, clip="last", batch_size=batch_size)
        self.videos = videos

    def read(self, *args, **kwargs):
        splits = super().read(*args, **kwargs)
        self.val_names = [Path(p).name for p in self.paths("val")]
        return splits

    def metrics(self, logits, targets) -> dict:
        cells = np.array([int(c) for c in self.ds.classes])
        hidden = [self.videos.get(n, {}).get("hidden") for n in self.val_names]
        return localization_metrics(cell_scores(logits, self.ds.classes), cells[np.asarray(targets)],
                                    hidden if len(hidden) == len(targets) else None)


def run_eval(checkpoint: str, tokenizer: str, data: str, out, frames: int = 16, stride: int = 2,
             layer: int | None = None, probe_epochs: int = 10, finetune_epochs: int = 3,
             random_init: bool = True, batch_size: int = 8, device: str = "auto", progress: bool = True,
             finetune_cfg: dict | None = None) -> dict:
    """``CaterTask`` run by the framework's ``TaskRun`` twice on one token cache: frozen (an
    attentive probe on one layer, ``toto probe``'s settings, on features computed once per model)
    and fine-tuned (CE + next-token
    loss, ``toto finetune``'s), each on ``checkpoint`` and, with ``random_init``, on the same
    architecture at random init; the oracle from ``data``'s ``cater.json``. Writes
    ``out/results.json`` and ``results.md``; ``out/<mode>/<model>/`` holds each run's per-epoch
    state (a rerun resumes it) and ``val_predictions.npz``."""
    from ..ioutil import atomic_write_bytes, atomic_write_json
    from ..tasks.base import TaskRun
    from ..train.distributed import world
    from .finetune import FinetuneConfig
    from .probe import ProbeConfig

    out, data = Path(out), Path(data)
    meta_path = data / "cater.json"
    if not meta_path.is_file():
        raise DataError(f"{data}: no cater.json; make the folder with toto lists cater")
    videos = {Path(k).name: v for k, v in json.loads(meta_path.read_text())["videos"].items()}
    task = CaterTask(data, videos, frames, stride, batch_size)
    probe = ProbeConfig(epochs=max(probe_epochs, 1)).validate()
    ft = FinetuneConfig(**{**(finetune_cfg or {}), "epochs": max(finetune_epochs, 1), "layer": layer,
                           "batch_size": batch_size}).validate()
    modes = {"frozen": (probe_epochs, dict(loop=probe.loop(), head_lr=probe.lr, weight_decay=probe.weight_decay,
                                           precompute=batch_size), {"probe": probe.to_dict()}),
             "finetuned": (finetune_epochs, dict(loop=ft.loop(), finetune=True, lr=ft.lr, head_lr=ft.probe_lr,
                                                 weight_decay=ft.weight_decay, ntp_weight=ft.ntp_weight,
                                                 dtype=ft.dtype), {"finetune": ft.to_dict()})}
    report = {"data": str(data), "frames": frames, "stride": stride, "clip": "last", "runs": {}}
    for mode, (epochs, kw, settings) in modes.items():
        if epochs <= 0:
            continue
        run = TaskRun(checkpoint, tokenizer, out / mode, random_init=random_init, device=device,
                      cache=str(out / "tokens"), resume=True, progress=progress, **kw)
        bb = run.load(task.spec)
        used = bb.check_layers([bb.n_layers // 2 if layer is None else layer])[0]
        task.probes = {"probe": (used, "attentive")}
        splits = run.read(task, bb)
        if len(splits["train"]) < 2 or len(splits["val"]) < 1:
            raise DataError(f"{data}: {len(splits['train'])} readable train and {len(splits['val'])} val clip(s); "
                            f"need at least 2 and 1")

        def on_epoch(name, s, mode=mode):
            from ..ioutil import append_jsonl

            append_jsonl(out / mode / "metrics.jsonl", {"model": name, "epoch": s.epoch, "step": s.step,
                                                        "time_s": s.time_s, "train_loss": s.train_loss["probe"],
                                                        "train_ntp": s.train_ntp, "val": s.val["probe"],
                                                        "val_ntp": s.val_ntp})
            (out / mode / name).mkdir(parents=True, exist_ok=True)
            task.save_predictions(out / mode / name / "val_predictions.npz", s.val_logits["probe"])

        run.train(task, bb, splits, {**settings, "layer": used}, on_epoch=on_epoch)
        for name in ["trained"] + ["random_init"] * random_init:
            path = out / mode / name / "val_predictions.npz"
            pred = np.load(path)
            report["runs"][f"{name}_{mode}"] = {
                "metrics": task.metrics(pred["logits"], pred["labels"]), "layer": used, "epochs": epochs,
                "predictions": str(path),
                "model": str(bb.path) if name == "trained" else f"random init of {bb.path} (seed {bb.cfg.train.seed})"}
    runs = report["runs"]
    rows = {f"{name}, {mode}": runs[f"{name}_{mode}"]["metrics"] for name in ("trained", "random_init")
            for mode in modes if f"{name}_{mode}" in runs}
    val = [n for n in getattr(task, "val_names", []) if n in videos]
    if any("last_seen_cell" in videos[n] for n in val):
        rows["oracle: last place seen"] = report["oracle"] = oracle_metrics([videos[n] for n in val])
    report["table"] = format_table(rows)
    if world()[0] == 0:
        atomic_write_json(out / "results.json", report)
        atomic_write_bytes(out / "results.md", report["table"].encode())
    return report
