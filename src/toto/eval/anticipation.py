"""Short-term object interaction anticipation with Toto as the video branch (arXiv 2501.05453,
Sec. 4 / Table 7): the Ego4D FRCNN+SlowFast design with SlowFast replaced by Toto.

    context frames (T x R x R) -> tokenizer -> [start] + T*h*w codes -> Toto
    residual stream at 5 layers (``pyramid_layers``: 0 = embeddings, then evenly up to the last
    block, e.g. 0,1,2,3,4 for 4 blocks, 0,3,6,9,12 for 12), each layer-normed and laid out as an
    (h, w) grid of [last frame's tokens, tokens averaged over the T frames, last minus first
    frame's tokens] (3D channels)
      -> ``Pyramid``: a 1x1 projection per layer to C channels, the shallowest layers at the
         finer scales (x2, x1), the deepest at the coarser ones (x1, 1/2, 1/4), fused top-down as
         in an FPN (upsample + add, then a 3x3 conv per level)
      -> RoIAlign (2x2 bins) of every detected box on every level, plus the box geometry, the
         detection score and the detected noun
      -> MLP -> verb logits and TTC = softplus(.)
    final score = detection score x verb confidence (the Ego4D baseline's combination);
    noun and box = the detector's.

Training targets as the Ego4D baseline builds them: a detection matched to a ground-truth object
with IoU >= 0.5 takes its verb and TTC, other detections are ignored; ground-truth boxes are added
as proposals in training. Loss = cross-entropy(verb) + smooth-L1(TTC), plus ``ntp_weight`` x the
next-token loss when the trunk is fine-tuned (the paper's fine-tuning recipe).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data.sta import StaExample, StaSplit
from ..config import option
from ..errors import CheckpointError, ConfigError, DataError
from ..ioutil import atomic_file, atomic_write_json
from ..jobstate import load_state, refuse_changed, save_state
from ..train.optim import adamw, cosine_lr, shift_targets
from .roi_align import roi_align
from .sta_metric import CHALLENGE, VERSION, Objects, box_iou, sta_map

MODES = ("frozen", "finetune")
SCALES = (2.0, 1.0, 1.0, 0.5, 0.25)  # pyramid level scale of each tapped layer, shallow -> deep
GRID_PARTS = 3  # per token: last frame, mean over frames, last minus first frame


def pyramid_layers(n_layers: int) -> list[int]:
    """Five tapped layers: the embeddings and four evenly spaced blocks up to the last."""
    if n_layers < 4:
        raise ConfigError(f"the 5-layer pyramid needs a model with >= 4 blocks, this one has {n_layers}")
    return [int(round(x)) for x in np.linspace(0, n_layers, 5)]


@dataclass
class StaConfig:
    frames: int = option(8, "context frames")
    stride: int = option(3, "frames between context frames")
    mode: str = option("frozen", "frozen trunk, or fine-tune it with the heads + next-token loss", choices=MODES)
    epochs: int = option(30, "")
    batch_size: int = option(16, "")
    lr: float = option(1e-3, "head learning rate")
    trunk_lr: float = option(1e-4, "trunk learning rate (finetune)")
    weight_decay: float = 0.05
    dropout: float = 0.3  # the heads see few examples
    ntp_weight: float = option(0.5, "next-token loss weight (finetune)")
    channels: int = 64
    hidden: int = 256
    roi_size: int = 2
    match_iou: float = 0.5
    seed: int = option(0, "")

    def validate(self) -> "StaConfig":
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("frames", "stride", "epochs", "batch_size", "channels", "hidden", "roi_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.match_iou <= 1:
            raise ConfigError(f"match_iou must be in (0, 1], got {self.match_iou}")
        return self


# --- the head -----------------------------------------------------------------------------------

class Pyramid(nn.Module):
    """Five (B, 3D, h, w) grids -> five fused (B, C, h_k, w_k) maps (scales ``SCALES``)."""

    def __init__(self, in_dim: int, channels: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(in_dim, channels, 1) for _ in SCALES)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in SCALES)

    def forward(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        h, w = grids[0].shape[-2:]
        feats = []
        for g, proj, s in zip(grids, self.proj, SCALES):
            x = proj(g)
            size = (max(1, round(h * s)), max(1, round(w * s)))
            feats.append(x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear",
                                                                  align_corners=False, antialias=s < 1))
        out = [None] * len(feats)
        top = None
        for k in range(len(feats) - 1, -1, -1):  # deepest (coarsest) first
            x = feats[k] if top is None else feats[k] + F.interpolate(top, size=feats[k].shape[-2:],
                                                                      mode="bilinear", align_corners=False)
            top = x
            out[k] = self.smooth[k](x)
        return out


class StaHead(nn.Module):
    """Pyramid + RoIAlign + MLP: per detected box, verb logits and a positive TTC (seconds)."""

    def __init__(self, dim: int, grid: tuple[int, int], n_nouns: int, n_verbs: int, cfg: StaConfig):
        super().__init__()
        self.grid, self.n_nouns, self.roi_size = grid, n_nouns, cfg.roi_size
        self.pyramid = Pyramid(GRID_PARTS * dim, cfg.channels)
        roi_dim = len(SCALES) * cfg.channels * cfg.roi_size ** 2
        extra = 4 + 1 + n_nouns + cfg.channels  # box geometry, detection score, noun, global context
        self.mlp = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(roi_dim + extra, cfg.hidden), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU())
        self.verb = nn.Linear(cfg.hidden, n_verbs)
        self.ttc = nn.Linear(cfg.hidden, 1)

    def forward(self, grids: list[torch.Tensor], rois: torch.Tensor, det_scores: torch.Tensor,
                det_nouns: torch.Tensor):
        """``grids``: 5 x (B, 3D, h, w); ``rois: (K, 5)`` [image, x1, y1, x2, y2] in units of the
        frame divided by its size (0..1) -> verb logits (K, V), TTC (K,)."""
        maps = self.pyramid(grids)
        gh, gw = self.grid
        feats = []
        for m in maps:
            mh, mw = m.shape[-2:]
            boxes = rois.clone()
            boxes[:, [1, 3]] *= mw
            boxes[:, [2, 4]] *= mh
            feats.append(roi_align(m, boxes, self.roi_size, 1.0, 2, True).flatten(1))
        idx = rois[:, 0].long()
        context = maps[-1].mean(dim=(2, 3))[idx]  # (K, C)
        geo = rois[:, 1:5]
        noun = F.one_hot(det_nouns, self.n_nouns).to(geo.dtype)
        z = self.mlp(torch.cat(feats + [geo, det_scores[:, None], noun, context], 1))
        return self.verb(z), F.softplus(self.ttc(z)).squeeze(1)


# --- trunk -----------------------------------------------------------------------------------------

def trunk_grids(model, tokens: torch.Tensor, layers: list[int], frames: int, grid: tuple[int, int],
                with_ntp: bool, pad: int):
    """One Toto pass over ``tokens: (B, 2 + T*h*w)`` -> 5 grids (B, 3D, h, w) [last frame's tokens,
    mean over frames, last minus first] and, with ``with_ntp``, the next-token loss of the sequence."""
    inputs, targets = shift_targets(tokens, pad)
    ntp = None
    if with_ntp:
        (_, ntp), states = model(inputs, targets, layers=layers)
    else:
        states = model(inputs, layers=layers, stop_at=max(layers))
    h, w = grid
    grids = []
    for l in layers:
        codes = states[l][:, 1:1 + frames * h * w].float()  # code positions
        codes = F.layer_norm(codes, codes.shape[-1:])  # layers differ in scale; the heads see unit scale
        codes = codes.reshape(codes.shape[0], frames, h, w, -1)
        g = torch.cat([codes[:, -1], codes.mean(1), codes[:, -1] - codes[:, 0]], -1)  # (B, h, w, 3D)
        grids.append(g.permute(0, 3, 1, 2).contiguous())
    return grids, ntp


# --- data -> tensors --------------------------------------------------------------------------------

@dataclass
class Prepared:
    """One split, ready for the model: token sequences and, per example, its proposals."""

    uids: list[str]
    tokens: torch.Tensor  # (N, 2 + T*h*w) int64
    boxes: list[np.ndarray]  # per example (P, 4) pixels of the annotated frame
    rois: list[np.ndarray]  # per example (P, 4) boxes / frame size
    scores: list[np.ndarray]  # detection scores (1.0 for added ground truth)
    nouns: list[np.ndarray]  # detected noun index
    verb_targets: list[np.ndarray]  # verb index or -100
    ttc_targets: list[np.ndarray]  # seconds or nan
    gts: list[Objects | None]


def prepare(examples: list[StaExample], tokenizer, layout, noun_index: dict[int, int],
            verb_index: dict[int, int], add_gt: bool, match_iou: float, batch_frames: int = 256) -> Prepared:
    seqs = []
    T = examples[0].frames.shape[0] if examples else 0
    per = max(1, batch_frames // max(T, 1))
    for s in range(0, len(examples), per):
        chunk = examples[s:s + per]
        codes = tokenizer.encode(np.concatenate([e.frames for e in chunk]))  # (n*T, h, w)
        codes = codes.reshape(len(chunk), T, *codes.shape[1:])
        seqs += [layout.sequence(c, "video").astype(np.int64) for c in codes]
    p = Prepared([], torch.from_numpy(np.stack(seqs)) if seqs else torch.zeros(0, 1, dtype=torch.long),
                 [], [], [], [], [], [], [])
    for e in examples:
        r = e.record
        boxes = [d.box for d in e.detections]
        scores = [d.score for d in e.detections]
        nouns = [noun_index[d.noun] for d in e.detections]
        gt = None
        if r.objects:
            gt = Objects(np.array([o.box for o in r.objects]), np.array([o.noun for o in r.objects]),
                         np.array([o.verb for o in r.objects]), np.array([o.ttc for o in r.objects]))
            if add_gt:
                boxes += [o.box for o in r.objects]
                scores += [1.0] * len(r.objects)
                nouns += [noun_index[o.noun] for o in r.objects]
        boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        vt = np.full(len(boxes), -100, dtype=np.int64)
        tt = np.full(len(boxes), np.nan)
        if gt is not None and len(boxes):
            iou = box_iou(boxes, gt.boxes)
            best, hit = iou.argmax(1), iou.max(1) >= match_iou
            vt[hit] = [verb_index[v] for v in gt.verbs[best[hit]]]
            tt[hit] = gt.ttcs[best[hit]]
        W, H = e.size
        p.uids.append(r.uid)
        p.boxes.append(boxes)
        p.rois.append(boxes / np.array([W, H, W, H], dtype=np.float64))
        p.scores.append(np.array(scores, dtype=np.float64))
        p.nouns.append(np.array(nouns, dtype=np.int64))
        p.verb_targets.append(vt)
        p.ttc_targets.append(tt)
        p.gts.append(gt)
    return p


def batch_rois(p: Prepared, idx, device):
    rois, scores, nouns, vt, tt, owner = [], [], [], [], [], []
    for j, i in enumerate(idx):
        n = len(p.rois[i])
        rois.append(np.concatenate([np.full((n, 1), j), p.rois[i]], 1))
        scores.append(p.scores[i])
        nouns.append(p.nouns[i])
        vt.append(p.verb_targets[i])
        tt.append(p.ttc_targets[i])
        owner += [i] * n
    def cat(xs, dt):
        return torch.from_numpy(np.concatenate(xs).astype(dt)).to(device)

    return (cat(rois, np.float32).reshape(-1, 5), cat(scores, np.float32), cat(nouns, np.int64),
            cat(vt, np.int64), cat(tt, np.float32), owner)


# --- predictions --------------------------------------------------------------------------------------

def results_from(p: Prepared, verb_probs: list[np.ndarray], ttcs: list[np.ndarray], noun_ids: list[int],
                 verb_ids: list[int], n_detections: list[int]) -> dict[str, list[dict]]:
    """Challenge-format predictions: detection box and noun, verb = argmax, score = det x verb."""
    out = {}
    for i, uid in enumerate(p.uids):
        n = n_detections[i]
        preds = []
        for k in range(n):
            v = int(verb_probs[i][k].argmax())
            preds.append({"box": [float(x) for x in p.boxes[i][k]],
                          "score": float(p.scores[i][k] * verb_probs[i][k][v]),
                          "noun_category_id": int(noun_ids[p.nouns[i][k]]),
                          "verb_category_id": int(verb_ids[v]), "time_to_contact": float(ttcs[i][k])})
        out[uid] = preds
    return out


def detections_only(p: Prepared, n_detections: list[int], verb_id: int, ttc: float, noun_ids: list[int]):
    """The baseline without a video model: detection score, the most frequent verb, the mean TTC."""
    out = {}
    for i, uid in enumerate(p.uids):
        out[uid] = [{"box": [float(x) for x in p.boxes[i][k]], "score": float(p.scores[i][k]),
                     "noun_category_id": int(noun_ids[p.nouns[i][k]]), "verb_category_id": int(verb_id),
                     "time_to_contact": float(ttc)} for k in range(n_detections[i])]
    return out


def score_results(results: dict[str, list[dict]], p: Prepared) -> dict:
    pairs = []
    for uid, gt in zip(p.uids, p.gts):
        preds = results.get(uid) or []
        pairs.append((Objects.from_records(preds, True) if preds else None, gt))
    return sta_map([x for x in pairs if x[1] is not None])


def write_results(path: str | Path, results: dict[str, list[dict]]) -> None:
    atomic_write_json(path, {"version": VERSION, "challenge": CHALLENGE, "results": results})


# --- the job -----------------------------------------------------------------------------------------

class StaModel:
    """Trunk + head + the label maps; ``predict`` gives challenge-format results."""

    def __init__(self, model, head: StaHead, layers: list[int], cfg: StaConfig, grid, layout,
                 noun_ids: list[int], verb_ids: list[int], device):
        self.model, self.head, self.layers, self.cfg, self.grid = model, head, layers, cfg, grid
        self.layout, self.noun_ids, self.verb_ids, self.device = layout, noun_ids, verb_ids, device

    def forward(self, p: Prepared, idx, with_ntp: bool, cached: list | None = None):
        rois, scores, nouns, vt, tt, owner = batch_rois(p, idx, self.device)
        if cached is not None:
            grids = [torch.stack([cached[i][k] for i in idx]).to(self.device) for k in range(len(self.layers))]
            ntp = None
        else:
            tokens = p.tokens[list(idx)].to(self.device)
            grids, ntp = trunk_grids(self.model, tokens, self.layers, self.cfg.frames, self.grid, with_ntp,
                                     self.layout.pad)
        logits, ttc = self.head(grids, rois, scores, nouns)
        return logits, ttc, vt, tt, ntp, owner

    @torch.no_grad()
    def grids_cache(self, p: Prepared, batch_size: int, progress: bool) -> list:
        out = []
        self.model.eval()
        for s in tqdm(range(0, len(p.uids), batch_size), desc="features", disable=not progress, leave=False):
            tokens = p.tokens[s:s + batch_size].to(self.device)
            grids, _ = trunk_grids(self.model, tokens, self.layers, self.cfg.frames, self.grid, False,
                                   self.layout.pad)
            for j in range(tokens.shape[0]):
                out.append([g[j].cpu() for g in grids])
        return out

    @torch.no_grad()
    def predict(self, p: Prepared, n_detections: list[int], cached: list | None = None) -> dict:
        self.model.eval()
        self.head.eval()
        probs, ttcs = [None] * len(p.uids), [None] * len(p.uids)
        bs = self.cfg.batch_size
        for s in range(0, len(p.uids), bs):
            idx = list(range(s, min(s + bs, len(p.uids))))
            logits, ttc, _, _, _, owner = self.forward(p, idx, False, cached)
            pr = logits.softmax(-1).cpu().numpy()
            tt = ttc.cpu().numpy()
            owner = np.array(owner)
            for i in idx:
                sel = owner == i
                probs[i], ttcs[i] = pr[sel], tt[sel]
        return results_from(p, probs, ttcs, self.noun_ids, self.verb_ids, n_detections)


def loss_of(logits, ttc, vt, tt, ntp, ntp_weight: float):
    hit = vt >= 0
    if hit.any():
        ce = F.cross_entropy(logits[hit], vt[hit])
        reg = F.smooth_l1_loss(ttc[hit], tt[hit], beta=0.1)
    else:
        ce = reg = logits.sum() * 0
    loss = ce + reg + (ntp_weight * ntp if ntp is not None else 0)
    return loss, ce, reg


def train_sta(sta: StaModel, train: Prepared, val: Prepared, val_ndet: list[int], out: Path,
              progress: bool = True) -> dict:
    """Train the head (and in ``finetune`` mode the trunk); a state file after every epoch makes
    a killed run resume exactly (batch order is a function of (seed, epoch))."""
    from ..tasks.base import batch_order

    cfg = sta.cfg
    finetune = cfg.mode == "finetune"
    for p in sta.model.parameters():
        p.requires_grad_(finetune)
    groups = [{"params": list(sta.head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if finetune:
        groups.append({"params": [p for p in sta.model.parameters()], "lr": cfg.trunk_lr,
                       "weight_decay": cfg.weight_decay})
    opt = adamw(groups, sta.device, cfg.lr)
    base_lrs = [g["lr"] for g in groups]
    n = len(train.uids)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    state_path = out / "state.pt"
    history, start = [], 0
    if state_path.exists():
        st = load_state(state_path, sta.device)
        refuse_changed(st["config"], asdict(cfg), state_path)
        sta.head.load_state_dict(st["head"])
        if finetune:
            sta.model.load_state_dict(st["trunk"])
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"])  # dropout draws: a resumed run continues the same sequence
        history, start = st["history"], st["epoch"]
    cached = None if finetune else sta.grids_cache(train, cfg.batch_size, progress)
    val_cached = None if finetune else sta.grids_cache(val, cfg.batch_size, progress)
    for epoch in range(start, cfg.epochs):
        sta.head.train()
        sta.model.train(finetune)
        order = batch_order(n, cfg.seed, epoch)  # the task framework's order: a function of (seed, epoch)
        sums = np.zeros(3)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for b in bar:
            step = epoch * steps_per_epoch + b
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = cosine_lr(step, total, 0, lr)
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            logits, ttc, vt, tt, ntp, _ = sta.forward(train, idx, finetune and cfg.ntp_weight > 0, cached)
            loss, ce, reg = loss_of(logits, ttc, vt, tt, ntp, cfg.ntp_weight)
            if not torch.isfinite(loss):
                raise DataError(f"non-finite loss at epoch {epoch + 1} step {b}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sums += [loss.item(), ce.item(), reg.item()]
        rec = {"epoch": epoch + 1, "loss": sums[0] / steps_per_epoch, "verb_ce": sums[1] / steps_per_epoch,
               "ttc_l1": sums[2] / steps_per_epoch}
        if epoch + 1 == cfg.epochs or (epoch + 1) % 5 == 0:
            rec["val"] = score_results(sta.predict(val, val_ndet, val_cached), val)
        history.append(rec)
        save_state(state_path, {"config": asdict(cfg), "head": sta.head.state_dict(), "optimizer": opt.state_dict(),
                                "trunk": sta.model.state_dict() if finetune else None, "history": history,
                                "epoch": epoch + 1, "rng": torch.get_rng_state()})
    return {"history": history, "val": history[-1].get("val") if history else None,
            "val_results": sta.predict(val, val_ndet, val_cached)}


def taxonomy_index(split: StaSplit) -> tuple[list[int], list[int]]:
    if not split.nouns or not split.verbs:
        raise DataError(f"{split.path}: no noun/verb taxonomy (noun_categories, verb_categories)")
    return sorted(split.nouns), sorted(split.verbs)


def save_head(out: Path, sta: StaModel, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in sta.head.state_dict().items()}
    if sta.cfg.mode == "finetune":
        tensors.update({f"trunk.{k}": v.detach().cpu().contiguous()
                        for k, v in sta.model.state_dict().items() if not k.startswith("rope_")})
    with atomic_file(out / "sta.safetensors") as tmp:
        save_file(tensors, str(tmp))
    atomic_write_json(out / "sta.json", meta)


def read_head(run: str | Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    run = Path(run)
    if not (run / "sta.json").is_file() or not (run / "sta.safetensors").is_file():
        raise CheckpointError(f"{run}: not a finished `toto anticipate train` run (sta.json, sta.safetensors)")
    return json.loads((run / "sta.json").read_text()), load_file(str(run / "sta.safetensors"))


def load_trunk(checkpoint, tokenizer_path, cfg: StaConfig, device, random_init: bool):
    """(trunk, backbone): the one loader's checks (toto.eval.backbone) for ``cfg.frames``-frame
    clips; the trunk is the trained model or its random-init baseline (seeded by ``cfg.seed``)."""
    from .backbone import load_backbone
    from .features import SequenceSpec

    bb = load_backbone(checkpoint, tokenizer_path, SequenceSpec("video", cfg.frames, cfg.stride), device)
    return (bb.random_init(cfg.seed) if random_init else bb.model), bb


def split_paths(annotations: str | Path) -> dict[str, Path]:
    from ..data.sta import SPLIT_FILES

    root = Path(annotations)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the folder holding fho_sta_*.json)")
    return {k: root / v for k, v in SPLIT_FILES.items()}


def read_split(path: Path, clips, detections, cfg: StaConfig, resolution: int, taxonomy=None, progress=True):
    """Annotations + detections + decoded contexts of one split; what was skipped is in split.skipped."""
    from ..data.sta import load_examples, read_annotations, read_detections

    split = read_annotations(path, taxonomy)
    sizes = {r.uid: (r.width, r.height) for r in split.records if r.width and r.height}
    dets = read_detections(detections, split.nouns, sizes, split.skipped)
    examples = load_examples(split, clips, dets, cfg.frames, cfg.stride, resolution, progress)
    if not examples:
        raise DataError(f"{path}: no usable annotation ({split.skipped.summary()})")
    return split, examples


def build_head(model, tok, nouns: list[int], verbs: list[int], cfg: StaConfig) -> StaHead:
    return StaHead(model.cfg.dim, tuple(tok.grid), len(nouns), len(verbs), cfg)


def train_job(checkpoint, tokenizer, annotations, clips, detections, out, cfg: StaConfig, random_init: bool,
              device_name: str = "auto", progress: bool = True) -> dict:
    from ..device import resolve_device

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device_name)
    model, bb = load_trunk(checkpoint, tokenizer, cfg, device, random_init)
    tok, layout, ckpt = bb.tokenizer, bb.layout, bb.path
    layers = pyramid_layers(len(model.layers))
    paths = split_paths(annotations)
    train_split, train_ex = read_split(paths["train"], clips, detections, cfg, tok.resolution, progress=progress)
    nouns, verbs = taxonomy_index(train_split)
    val_split, val_ex = read_split(paths["val"], clips, detections, cfg, tok.resolution,
                                   (train_split.nouns, train_split.verbs), progress)
    ni, vi = {n: i for i, n in enumerate(nouns)}, {v: i for i, v in enumerate(verbs)}
    train = prepare(train_ex, tok, layout, ni, vi, True, cfg.match_iou)
    val = prepare(val_ex, tok, layout, ni, vi, False, cfg.match_iou)
    val_ndet = [len(e.detections) for e in val_ex]
    torch.manual_seed(cfg.seed)
    head = build_head(model, tok, nouns, verbs, cfg).to(device)
    sta = StaModel(model, head, layers, cfg, tuple(tok.grid), layout, nouns, verbs, device)
    result = train_sta(sta, train, val, val_ndet, out, progress)
    all_verbs = [o.verb for r in train_split.records for o in r.objects]
    all_ttcs = [o.ttc for r in train_split.records for o in r.objects]
    prior = {"verb": int(np.bincount(all_verbs).argmax()), "ttc": float(np.mean(all_ttcs))}
    baseline = score_results(detections_only(val, val_ndet, prior["verb"], prior["ttc"], nouns), val)
    write_results(out / "val_results.json", result["val_results"])
    meta = {"checkpoint": str(ckpt), "tokenizer": str(Path(tokenizer).resolve()), "random_init": random_init,
            "config": asdict(cfg), "layers": layers, "scales": list(SCALES), "nouns": nouns, "verbs": verbs,
            "prior": prior}
    save_head(out, sta, meta)
    report = {**meta, "val": result["val"], "detections_only_val": baseline, "history": result["history"],
              "train_examples": len(train_ex), "val_examples": len(val_ex),
              "skipped": {"train": train_split.skipped.items, "val": val_split.skipped.items}}
    atomic_write_json(out / "report.json", report)
    return report


def predict_job(run, annotations_file, clips, detections, out, detections_only_mode: bool = False,
                device_name: str = "auto", progress: bool = True) -> dict:
    """Challenge-format results for every uid of ``annotations_file`` (uids whose clip is missing,
    corrupt or too short get an empty list and are counted)."""
    from ..device import resolve_device

    meta, tensors = read_head(run)
    cfg = StaConfig(**meta["config"])
    device = resolve_device(device_name)
    model, bb = load_trunk(meta["checkpoint"], meta["tokenizer"], cfg, device, meta["random_init"])
    tok, layout = bb.tokenizer, bb.layout
    nouns, verbs = meta["nouns"], meta["verbs"]
    from ..data.sta import read_annotations

    tax = read_annotations(annotations_file)
    taxonomy = ({n: str(n) for n in nouns}, {v: str(v) for v in verbs}) if not tax.nouns else None
    split, examples = read_split(Path(annotations_file), clips, detections, cfg, tok.resolution, taxonomy, progress)
    ni, vi = {n: i for i, n in enumerate(nouns)}, {v: i for i, v in enumerate(verbs)}
    p = prepare(examples, tok, layout, ni, vi, False, cfg.match_iou)
    ndet = [len(e.detections) for e in examples]
    if detections_only_mode:
        results = detections_only(p, ndet, meta["prior"]["verb"], meta["prior"]["ttc"], nouns)
    else:
        head = build_head(model, tok, nouns, verbs, cfg).to(device)
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        trunk = {k[6:]: v for k, v in tensors.items() if k.startswith("trunk.")}
        if trunk:
            model.load_state_dict(trunk, strict=False)
        sta = StaModel(model, head, meta["layers"], cfg, tuple(tok.grid), layout, nouns, verbs, device)
        results = sta.predict(p, ndet)
    for r in split.records:
        results.setdefault(r.uid, [])
    write_results(out, results)
    return {"uids": len(split.records), "predicted": len(examples), "skipped": split.skipped.counts(),
            "scores": score_results(results, p) if any(g is not None for g in p.gts) else None}
