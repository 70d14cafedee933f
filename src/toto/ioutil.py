"""Atomic writes (write to a temporary name in the same folder, then rename) and the exclusive
lock every writing job takes on its output folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from .errors import CheckpointError, DataError, TotoError

LOCK_NAME = ".toto.lock"


class FolderLockedError(TotoError):
    """Another live process is writing the same output folder."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing; a failed write (full disk, read-only folder,
    ``path`` naming a folder) leaves neither a partial file nor a ``.tmp`` behind."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder (a file name is expected here)")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """For writers that need a file name (safetensors, matplotlib, PIL, PyAV): yields a
    temporary name next to ``path`` with the same suffix (some writers pick the format by it),
    which replaces ``path`` when the block succeeds and is removed when it fails."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder (a file name is expected here)")
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | Path, dpi: int = 120) -> None:
    """Write a matplotlib figure all or nothing (the format follows the suffix) and close it."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def fresh_tmp_dir(final_dir: Path) -> Path:
    """An empty ``<final_dir>.tmp`` to fill and then ``atomic_replace_dir`` into place (a
    leftover from a killed write is removed first)."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is removed first."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path):
    """A folder written all or nothing (a checkpoint, an export): yields an empty
    ``<final_dir>.tmp`` to fill, which replaces ``final_dir`` when the block succeeds and is
    removed when it fails (a kill leaves it to the next write, which clears it first)."""
    final_dir = Path(final_dir)
    tmp = fresh_tmp_dir(final_dir)
    try:
        yield tmp
        atomic_replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a log the program appends to (metrics.jsonl). A kill during an append leaves
    a torn last line: it is dropped (the resumed run logs that step again). A bad line anywhere
    else is damage, not a kill: DataError naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}:{i + 1}: not a JSON record ({e})") from None
    return out


def read_json(path: str | Path):
    """A JSON file the program wrote (state, index, results); DataError naming it when it is
    missing, truncated or garbled."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: corrupt or truncated JSON ({e})") from None


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    """All tensors of a safetensors file; DataError naming it when it is missing, truncated or
    not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise DataError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def read_text(path: str | Path) -> str:
    """A user's text file (config, media and label lists, split files): UTF-8 with or without
    a byte-order mark (Windows editors write one); DataError naming the file when it is not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def read_lines(path: str | Path) -> list[str]:
    """The lines of a user's text file (see read_text), any line ending."""
    return read_text(path).splitlines()


@contextlib.contextmanager
def dir_lock(folder: str | Path, what: str = "job"):
    """Hold an exclusive lock on ``folder`` (created if missing) while a job writes it.

    Two jobs writing one folder corrupt it (interleaved metrics, shards of one run deleted by
    the other), so the second is refused with one line naming the holder. The lock is an
    ``flock`` on ``<folder>/.toto.lock``: the kernel drops it when its process dies, however it
    dies, so a killed job never leaves a stale lock behind (on one host; network file systems
    without flock support are not covered): the file it leaves is taken over by the next job."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{folder}: is a file (an output folder is expected here)")
    with _flock(folder / LOCK_NAME, folder, "folder", what) as path:
        yield path


@contextlib.contextmanager
def file_lock(file: str | Path, what: str = "job"):
    """The same lock for an output written whole at one path: a file (a tokenizer, a list, a
    results JSON) or a folder swapped in whole (the HF export). An ``flock`` on the hidden
    sibling ``.<name>.lock``, so two jobs writing one output conflict while jobs writing other
    files of that folder do not."""
    file = Path(file)
    with _flock(file.with_name(f".{file.name}.lock"), file, "file", what) as path:
        yield path


@contextlib.contextmanager
def _flock(path: Path, target: Path, kind: str, what: str):
    """Hold an exclusive ``flock`` on the file ``path`` for ``target``; the file records who holds
    it (for the second job's message) and is removed on release, with the folders made for it
    if they are still empty (a job that fails early leaves nothing behind). Removing it is safe
    because a job that got the lock checks the file it locked is still the one at ``path``
    (else it locked a removed file and tries again)."""
    import fcntl
    import socket
    import time

    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    above = path.parent.parents[len(made) - 1] if made else path.parent  # the nearest existing folder
    if not above.is_dir():
        raise DataError(f"{above}: not a folder (a file is in the way of {target})")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _locked_fd(path, target, kind, what)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it (see above)
        os.close(fd)  # releases the flock
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # innermost first
        try:
            d.rmdir()
        except OSError:  # not empty (the job wrote there), or gone
            return


def _locked_fd(path: Path, target: Path, kind: str, what: str) -> int:
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only or forbidden folder: name it, not our lock file
            raise OSError(e.errno, e.strerror, str(path.parent)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderLockedError(f"{target} is being written by another {what} ({holder}); wait for it "
                                    f"to finish or use another output {kind}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: lock the new one


def run_files(folder: str | Path) -> list[Path]:
    """What a run folder holds besides its lock (empty: a new job may start there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME)


def clear_folder(folder: str | Path) -> None:
    """Delete what a run folder holds but its lock (``--overwrite``, ``--fresh``): removing the
    held lock file too would let a second job lock a new one while this one still writes."""
    for p in run_files(folder):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


CHECKSUMS = "checksums.json"


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | Path) -> None:
    """Record one SHA-256 per file of a folder being written (a checkpoint), so a reader can
    tell a file damaged after the write (a bad disk, a partial copy, an edit) from a good one:
    safetensors checks its header, not its bytes, and garbage weights load silently."""
    folder = Path(folder)
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    atomic_write_json(folder / CHECKSUMS, sums)


def verify_checksums(folder: str | Path, names: list[str]) -> None:
    """Check ``names`` against the folder's recorded checksums (folders written before they
    were recorded are accepted as they are); CheckpointError naming the first damaged file."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return
    sums = read_json(folder / CHECKSUMS)
    for name in names:
        if name in sums and (not (folder / name).is_file() or file_sha256(folder / name) != sums[name]):
            raise CheckpointError(f"{folder / name}: does not match the checksum recorded when it was written "
                                  f"(damaged or changed since); restore it or resume from another checkpoint")
