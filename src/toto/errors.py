"""Exceptions the CLI turns into one clear line and a non-zero exit code."""

import errno
import json


class TotoError(Exception):
    """Base class: anything a user can fix (bad input, bad config, missing file)."""


class ConfigError(TotoError, ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(TotoError):
    """Input data (shards, media, index files) is missing, corrupt or incompatible."""


class CheckpointError(TotoError):
    """A checkpoint is missing, incomplete or does not match the run."""


class TrainingError(TotoError):
    """Training diverged or cannot continue (e.g. a non-finite loss)."""


# OSError numbers that mean "this path cannot be used as given", with what to tell the user
_OS_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device (free some and rerun: finished work is kept)",
    errno.EDQUOT: "disk quota exceeded (free some and rerun: finished work is kept)",
    errno.EISDIR: "is a folder (a file name is expected here)",
    errno.ENOTDIR: "not a folder (a file is in the way on this path)",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.ENOTEMPTY: "folder is not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def user_error(e: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug (keep the traceback).

    The one place that maps low-level failures to messages: TotoError as raised; OSErrors
    about a path (read-only folder, full disk, ``--out`` naming a folder or a file); running
    out of memory; corrupt JSON or safetensors files read without a clearer check.
    """
    if isinstance(e, TotoError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _OS_REASONS:
        reason = _OS_REASONS[e.errno]
        if e.filename2 is not None and e.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY):
            return f"{e.filename2}: {reason}"  # a rename onto a bad target: name the target
        return f"{e.filename}: {reason}" if e.filename is not None else reason
    if _is_out_of_memory(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (f"out of memory ({first[:200]}); use a smaller model, batch (train.micro_batch_size) or context "
                f"(model.max_seq_len)")
    if type(e).__name__ == "SafetensorError":
        return f"corrupt or truncated safetensors file ({e})"
    if isinstance(e, json.JSONDecodeError):
        return f"corrupt JSON file ({e})"
    return None


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))
