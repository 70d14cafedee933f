"""Training on a weighted mix of shard folders: shares, exact resume, refusals, per-source val."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import write_shards
from test_trainer import cfg_for, losses
from toto.cli import main
from toto.config import build_config, data_paths
from toto.data.loader import TrainLoader, split_indices
from toto.data.mix import MixedLoader, MixedShards, make_loader, mixed_order, open_shards, split_sources
from toto.data.shards import ShardDataset
from toto.errors import ConfigError
from toto.ioutil import read_jsonl
from toto.train.trainer import Trainer


@pytest.fixture
def two(tmp_path):
    a = write_shards(tmp_path / "imagenet", n_seq=40, seed=1, kind="image")
    b = write_shards(tmp_path / "kinetics", n_seq=24, seed=2, kind="video")
    return a, b


def test_config_accepts_lists_and_names_bad_fields(tmp_path):
    c = build_config(None, None, ["data.path=x,y", "data.weights=[1, 3]"])
    assert data_paths(c.data) == ["x", "y"] and c.data.weights == [1.0, 3.0]
    c = build_config(None, None, ["data.path=[x, y]", "data.weights=0.25,0.75"])
    assert data_paths(c.data) == ["x", "y"] and c.data.weights == [0.25, 0.75]
    yml = tmp_path / "c.yaml"
    yml.write_text("data:\n  path: [x, y]\n  weights: [2, 1]\n")
    assert build_config(None, str(yml), []).data.path == ["x", "y"]
    with pytest.raises(ConfigError, match="data.weights has 3 value.*2 folder"):
        build_config(None, None, ["data.path=x,y", "data.weights=[1,2,3]"])
    with pytest.raises(ConfigError, match="data.weights must all be finite and > 0"):
        build_config(None, None, ["data.path=x,y", "data.weights=[1,0]"])
    with pytest.raises(ConfigError, match=r"data.weights\[1\]: expected float"):
        build_config(None, None, ["data.weights=[1,abc]"])


def test_mixed_dataset_concatenates_sources(two):
    a, b = two
    ds = open_shards([str(a), str(b)])
    da, db = ShardDataset(a), ShardDataset(b)
    assert isinstance(ds, MixedShards) and len(ds) == 64 and ds.names == ["imagenet", "kinetics"]
    assert np.array_equal(ds.batch([0, 39, 40, 63]), np.stack([da[0], da[39], db[0], db[23]]))
    splits = split_sources(ds, 0.1, 100, seed=0)
    for (tr, va), (lo, hi), n in zip(splits, [(0, 40), (40, 64)], [40, 24]):
        ref_tr, ref_va = split_indices(n, 0.1, 100, 0)
        assert np.array_equal(tr, ref_tr + lo) and np.array_equal(va, ref_va + lo)
        assert tr.min() >= lo and max(tr.max(), va.max()) < hi


def test_empirical_shares_match_weights():
    """Source shares over many slots fall within 4 binomial standard deviations of the weights,
    and a small, heavily weighted source cycles through its sequences evenly."""
    sources = [np.arange(0, 50), np.arange(50, 60), np.arange(60, 160)]
    w = np.array([0.2, 0.5, 0.3])
    counts, total = np.zeros(3), 0
    for epoch in range(40):
        order = mixed_order(sources, w, seed=3, epoch=epoch)
        assert len(order) == 160
        src = np.searchsorted([50, 60], order, side="right")
        counts += np.bincount(src, minlength=3)
        total += len(order)
        # source 1 (10 sequences, ~80 draws an epoch): every sequence used floor or ceil times
        per_seq = np.bincount(order[src == 1] - 50, minlength=10)
        assert per_seq.max() - per_seq.min() <= 1
    for k in range(3):
        sd = math.sqrt(total * w[k] * (1 - w[k]))
        assert abs(counts[k] - total * w[k]) < 4 * sd, (k, counts, total)
    assert np.array_equal(mixed_order(sources, w, 3, 5), mixed_order(sources, w, 3, 5))
    assert not np.array_equal(mixed_order(sources, w, 3, 5), mixed_order(sources, w, 3, 6))


def test_loader_batches_follow_order_and_resume_across_world_sizes(two):
    ds = open_shards([str(x) for x in two])
    tr = [s[0] for s in split_sources(ds, 0.1, 100, 0)]
    w = np.array([0.3, 0.7])
    a = MixedLoader(ds, tr, w, 4, seed=7)
    ref = [a.next_batch() for _ in range(40)]  # 57 train sequences: 14 batches an epoch
    order0 = mixed_order([np.asarray(t) for t in tr], w, 7, 0)
    assert torch.equal(ref[0], torch.from_numpy(ds.batch(order0[:4]).astype(np.int64)))
    b = MixedLoader(ds, tr, w, 4, seed=7)
    for _ in range(10):
        b.next_batch()
    ranks = [MixedLoader(ds, tr, w, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        ld.load_state_dict(b.state_dict())
    for r in ref[10:]:
        assert torch.equal(torch.cat([ld.next_batch() for ld in ranks]), r)


def test_single_folder_order_identical_to_plain_loader(tmp_path, two):
    a = two[0]
    for path in (str(a), f"[{a}]"):
        tr = Trainer(cfg_for(path, tmp_path / "r", 3), progress=False)
        ds = ShardDataset(a)
        t_idx, v_idx = split_indices(len(ds), 0.1, 64, 0)
        plain = TrainLoader(ds, t_idx, 4, seed=0)
        assert type(tr.loader) is TrainLoader and np.array_equal(tr.val_idx, v_idx)
        assert all(torch.equal(tr.loader.next_batch(), plain.next_batch()) for _ in range(25))
        assert tr.evaluate() is not None and tr.val_by_source == {}
        tr.close()  # releases the run folder's lock for the next construction
    # a mixed loader over one source with default weights is a different order: the plain path is kept
    assert type(make_loader(ds, [t_idx], np.ones(1), 4, 0)) is TrainLoader


def test_mixed_run_resumes_exactly_and_logs_per_source_val(tmp_path, two):
    data = f"{two[0]},{two[1]}"
    extra = ("data.weights=[1,3]",)
    Trainer(cfg_for(data, tmp_path / "a", 16, *extra), progress=False).fit()
    Trainer(cfg_for(data, tmp_path / "b", 16, *extra), progress=False).fit(until=7)
    with pytest.raises(ConfigError, match=r"other settings: data\.weights \(\[1\.0, 3\.0\] -> \[1\.0, 1\.0\]\)"):
        Trainer(cfg_for(data, tmp_path / "b", 16, "data.weights=[1,1]"), resume=True, progress=False)
    with pytest.raises(ConfigError, match="this run trained on 2 folder.*imagenet.*kinetics.*now names 1"):
        Trainer(cfg_for(str(two[0]), tmp_path / "b", 16), resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"trained on imagenet \(40 seq, weight 0.25\), kinetics"):
        Trainer(cfg_for(f"{two[1]},{two[0]}", tmp_path / "b", 16), resume=True, progress=False)
    Trainer(cfg_for(data, tmp_path / "b", 16), resume=True, progress=False).fit()
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 16 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6

    vals = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [10, 16]
    # val split: 4 of 40 and 2 of 24 sequences, 17 targets each, so the pooled loss is 4:2
    for r in vals:
        assert r["val_loss"] == pytest.approx((4 * r["val_loss/imagenet"] + 2 * r["val_loss/kinetics"]) / 6)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [(s["name"], s["n_sequences"], s["n_train"]) for s in summary["data"]] == \
        [("imagenet", 40, 36), ("kinetics", 24, 22)]
    assert [s["weight"] for s in summary["data"]] == pytest.approx([0.25, 0.75])


def test_mismatched_folders_refused_in_one_line(tmp_path, capsys):
    a = write_shards(tmp_path / "a", n_seq=24, n_codes=32)
    b = write_shards(tmp_path / "b", n_seq=24, n_codes=40)
    c = write_shards(tmp_path / "c", n_seq=24, frames=3)
    for other, what in ((b, "vocabulary layout"), (c, "seq_len")):
        assert main(["train", "--preset", "tiny", "--data", f"{a},{other}", "--out", str(tmp_path / "r"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot mix {a} and {other}: their {what} differ" in err[0]
    assert main(["train", "--preset", "tiny", "--data", f"{a},{tmp_path / 'nope'}",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.path[1]" in err[0] and "index.json not found" in err[0]
