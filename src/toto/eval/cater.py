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
