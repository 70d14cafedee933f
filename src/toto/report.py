"""Plots and a Markdown report of a pipeline run (what `toto quickstart` writes).

Reads each stage's own JSON outputs; a stage that did not run is reported as missing rather
than failing the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .ioutil import atomic_file, atomic_write_bytes, read_jsonl, save_figure


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(run_dir: Path, path: Path, uniform: float | None = None) -> bool:
    """Train and validation loss against tokens seen, with ln(vocab) for reference."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    train = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
    if not train:
        return False
    tokens_at = {r["step"]: r["tokens"] for r in recs if "tokens" in r}
    val = [(tokens_at.get(r["step"]), r["val_loss"]) for r in recs if "val_loss" in r]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train", lw=1)
    val = [(t, v) for t, v in val if t is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    if uniform:
        ax.axhline(uniform, color="gray", ls="--", lw=1, label="uniform (ln V)")
    ax.set_xlabel("tokens")
    ax.set_ylabel("next-token NLL (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def reconstruction_grid(tokenizer, frames: np.ndarray, path: Path) -> float:
    """Originals (top) over their reconstructions (bottom) as one PNG; returns PSNR in dB."""
    from PIL import Image

    from .tokenizers.stats import psnr

    recon = tokenizer.decode(tokenizer.encode(frames))
    grid = np.concatenate([np.concatenate(list(frames), 1), np.concatenate(list(recon), 1)], 0)
    with atomic_file(path) as tmp:
        Image.fromarray(grid).save(tmp)
    return psnr(frames, recon)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _rel(path: Path, root: Path) -> str:
    """A link from the report in ``root`` to ``path`` (however either was given: absolute or
    relative to the working directory), so the report's images show wherever it is opened."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def write_report(qs) -> Path:
    """Markdown report with PNG plots for a ``toto.quickstart.Quickstart`` run."""
    root, p = qs.o.out, qs.paths
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    lines = ["# toto run report", "",
             f"Preset `{qs.o.preset}`, frames {qs.o.resolution}x{qs.o.resolution}, {qs.o.frames} frames "
             f"(stride {qs.o.stride}) or images per sequence.", ""]

    shards = _load(p["shards"] / "summary.json")
    index = _load(p["shards"] / "index.json")
    if shards and index:
        lines += ["## Data", "",
                  f"{index['n_sequences']} sequences of {index['seq_len']} tokens "
                  f"({index['n_tokens']:,} tokens; grid {index['grid'][0]}x{index['grid'][1]} per frame, "
                  f"vocabulary {index['vocab']['vocab_size']} = {index['vocab']['n_codes']} codes + "
                  f"{index['vocab']['n_special']} specials).", "",
                  "```", json.dumps({k: v for k, v in shards.items() if not isinstance(v, (dict, list))},
                                    indent=1)[:1500], "```", ""]

    if qs.tok_file.is_file():
        from .data.video import read_video
        from .tokenizers.base import get_tokenizer

        tok = get_tokenizer(qs.tok_file)
        clips = sorted((p["media"] / "heldout").glob("*.mp4")) or []
        if clips:
            frames = read_video(clips[0], stride=qs.o.stride, resolution=tok.resolution)[:8]
            psnr = reconstruction_grid(tok, frames, fig_dir / "reconstructions.png")
            lines += ["## Tokenizer", "", f"`{tok.kind}` tokenizer, {tok.n_codes} codes, {tok.downsample}x"
                      f"{tok.downsample} px per code. Held-out clip (top) and its reconstruction from "
                      f"tokens (bottom): PSNR {psnr:.1f} dB.", "",
                      "![reconstructions](figures/reconstructions.png)", ""]

    summary = _load(p["run"] / "summary.json")
    if summary:
        plot_loss(p["run"], fig_dir / "loss.png", summary.get("uniform_loss"))
        val = summary.get("val_loss")
        lines += ["## Pre-training", "",
                  f"{summary['steps']} steps, {summary['tokens']:,} tokens: train loss "
                  f"{summary['train_loss']:.3f}, validation loss "
                  f"{'n/a' if val is None else f'{val:.3f}'} nats (uniform over the vocabulary: "
                  f"{summary['uniform_loss']:.3f}).", "", "![loss](figures/loss.png)", ""]

    probe = _load(p["probe"] / "results.json")
    if probe and "best" in probe["models"].get("trained", {}):
        lines += ["## Attentive probing per layer", "",
                  f"{probe['n_classes']} classes from `{probe['data']}`; top-1 on the validation split.", "",
                  "| layer | " + " | ".join(f"{m} {pool}" for m in probe["models"] for pool in probe["poolings"]) + " |",
                  "|---" * (1 + len(probe["models"]) * len(probe["poolings"])) + "|"]
        for layer in probe["layers"]:
            cells = [probe["models"][m]["layers"][str(layer)][pool]["top1"] for m in probe["models"]
                     for pool in probe["poolings"]]
            lines.append(f"| {layer} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
        b = probe["models"]["trained"]["best"]
        lines += ["", f"Best layer of the trained model: {b['layer']} ({b['pooling']} pooling, "
                  f"{100 * b['top1']:.1f}%)."]
        if "random_init" in probe["models"]:
            r = probe["models"]["random_init"]["best"]
            lines.append(f"Random-init baseline, best layer: {r['layer']} ({100 * r['top1']:.1f}%).")
        lines += ["", f"![probe]({_rel(p['probe'] / 'probe.png', root)})", ""]

    ft = _load(p["finetune"] / "results.json")
    if ft and ft.get("final") and probe:
        layer, f = ft["layer"], ft["final"]
        frozen = probe["models"]["trained"]["layers"][str(layer)].get("attentive", {}).get("top1")
        lines += ["## Fine-tuning with the probe", "",
                  f"The whole model and an attentive probe on layer {layer} (the best probed layer) trained "
                  f"together, loss = probe cross-entropy + {ft['finetune']['ntp_weight']:g} x next-token loss "
                  f"(`toto finetune`). Val top-1: {100 * ft['first_epoch']['val_top1']:.1f}% after epoch 1, "
                  f"**{100 * f['val_top1']:.1f}%** after epoch {f['epoch']}"
                  + (f"; the frozen attentive probe on that layer: {100 * frozen:.1f}%." if frozen is not None else "."),
                  "", f"![finetune]({_rel(p['finetune'] / 'finetune.png', root)})", ""]

    tracks = {name: _load(p[key] / "results.json") for name, key in
              (("model", "track"), ("pixels", "track_pixels"), ("copy first mask", "track_copy"))}
    if any(tracks.values()):
        lines += ["## Label-propagation tracking (J&F)", "", "| features | J&F | J | F |", "|---|---|---|---|"]
        for name, res in tracks.items():
            if res and res.get("overall"):
                o = res["overall"]
                lines.append(f"| {name} | {o['J&F-Mean']:.3f} | {o['J-Mean']:.3f} | {o['F-Mean']:.3f} |")
        gifs = sorted(p["track"].glob("overlay_*.gif"))
        if gifs:
            lines += ["", f"![tracking overlay]({_rel(gifs[0], root)})"]
        lines.append("")

    fc = _load(p["forecast"] / "forecast.json")
    if fc:
        lines += ["## Forecasting", "",
                  f"{fc['settings']['context_frames']} context frames, {fc['settings']['frames']} forecast "
                  f"frames, sampled token by token with the KV cache "
                  f"({fc['generation']['tokens_per_s']:.0f} tokens/s on {fc['generation']['device']}).", ""]
        cols = [("token accuracy", "token_accuracy", "{:.3f}"), ("copy-last token acc.", "copy_last_token_accuracy", "{:.3f}"),
                ("PSNR (dB)", "psnr", "{:.1f}"), ("copy-last PSNR", "copy_last_psnr", "{:.1f}"),
                ("SSIM", "ssim", "{:.3f}"), ("tokenizer PSNR (ceiling)", "tokenizer_psnr", "{:.1f}")]
        lines += ["Means over forecast frames against the real frames; *copy-last* repeats the last context "
                  "frame, the baseline a model has to beat.", "",
                  "| clip | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for item in fc["items"]:
            m = item["mean"]
            cells = [fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "-" for _, key, fmt in cols]
            lines.append(f"| {item['name']} | " + " | ".join(cells) + " |")
        lines.append("")
        for item in fc["items"]:
            lines += [f"![forecast {item['name']}]({_rel(p['forecast'] / item['files']['strip'], root)})", ""]

    cater = _load(p["cater"] / "eval" / "results.json")
    if cater:
        lines += ["## Object permanence (CATER-style clips)", "",
                  f"{qs.o.cater_clips} clips rendered with MuJoCo (`toto synth cater`): predict the cell of a 6x6 "
                  f"floor grid holding the golden snitch at the last of {cater['frames']} frames, often under a "
                  "cone that carried it. Frozen attentive probe and one epoch of fine-tuning (CE + next-token "
                  "loss) of the pre-trained model vs the same at random init, and the oracle that answers where "
                  "the snitch was last uncovered (`toto cater`). Val clips only, so few that the numbers are "
                  "noise: this shows the pipeline runs, see docs/cater.md for a larger run.", "",
                  cater["table"]]
        if (p["cater"] / "carried.png").exists():
            lines += ["A clip where a cone covers the snitch and carries it (red frames: snitch covered):", "",
                      f"![carried]({_rel(p['cater'] / 'carried.png', root)})", ""]

    if qs.timings:
        lines += ["## Time per stage (this invocation)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in qs.timings.items()]
        lines.append("")
    out = root / "report.md"
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out
