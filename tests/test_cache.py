"""The one evaluation cache (toto.eval.cache): a checksum per array recorded at write and
checked at read, so a damaged token or feature file is a one-line error naming it, never used;
deleting the file recomputes that chunk."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from toto.cli import main
from toto.errors import DataError


def _garble(path, offset_from_end: int = 3) -> None:
    """Flip one byte near the end of the file: inside the last array's data, header intact."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_recorded_at_write_refuse_a_garbled_chunk_and_a_deleted_one_is_recomputed(tmp_path):
    from toto.eval.cache import ChunkCache

    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    c = ChunkCache(tmp_path, {"x": 1}, ["train"])
    assert c.todo("train", 2) == [0, 1]
    c.put("train", 0, {"f": a}, 3, labels=[0, 1, 1])
    c.put("train", 1, {}, 0)  # an empty chunk: nothing written, still done
    rec = c.records("train")[0]
    assert rec["sha256"]["f"] == hashlib.sha256(a.tobytes()).hexdigest()  # independent: the raw bytes
    again = ChunkCache(tmp_path, {"x": 1}, ["train"])
    assert again.todo("train", 2) == [] and again.folder == c.folder
    np.testing.assert_array_equal(again.read(again.records("train")[0], "f"), a)
    assert ChunkCache(tmp_path, {"x": 2}, ["train"]).folder != c.folder  # another identity, another folder

    path = c.folder / rec["file"]
    _garble(path)
    with pytest.raises(DataError) as e:
        again.read(again.records("train")[0], "f")
    msg = str(e.value)
    assert msg.startswith(f"{path}: f does not match the checksum") and "\n" not in msg
    path.unlink()
    assert ChunkCache(tmp_path, {"x": 1}, ["train"]).todo("train", 2) == [0]


def test_garbled_token_and_feature_caches_stop_the_job_naming_the_file(eval_world, tmp_path, capsys):
    """probe (feature cache) and finetune (token cache) on a cache with one flipped byte: exit 2,
    one line naming the damaged file; after deleting it the rerun recomputes it and matches."""
    base = ["--checkpoint", eval_world / "run", "--tokenizer", eval_world / "tok.safetensors", "--data",
            eval_world / "data", "--no-progress", "--device", "cpu"]
    cases = {"probe": ["probe", "--layers", "1", "--pooling", "average", "--epochs", "2"],
             "finetune": ["finetune", "--epochs", "1", "--batch-size", "4"]}
    for name, cmd in cases.items():
        cache = tmp_path / f"{name}_cache"
        argv = [*cmd, *base, "--cache", cache]
        assert main(list(map(str, [*argv, "--out", tmp_path / f"{name}1"]))) == 0
        capsys.readouterr()
        chunk = sorted(cache.glob("*/val_*.safetensors"))[0]
        good = chunk.read_bytes()
        _garble(chunk)
        assert main(list(map(str, [*argv, "--out", tmp_path / f"{name}2"]))) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{chunk}: " in err and "does not match the checksum" in err, err
        chunk.unlink()
        assert main(list(map(str, [*argv, "--out", tmp_path / f"{name}3"]))) == 0
        assert chunk.read_bytes() == good  # recomputed, byte for byte
