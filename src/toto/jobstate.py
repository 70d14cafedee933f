"""What every resumable job shares (pre-training, the task loop, dVAE training, behaviour
cloning, anticipation): a resume must continue the run that was started, exactly.

- ``refuse_changed``: a resume whose settings differ from the saved ones is refused with one
  line naming each changed field and both values (a silently mixed run is worse than none).
- ``trim_metrics``: a kill after a logged record but before the next saved state leaves records
  the resumed run will log again; they are dropped from ``metrics.jsonl`` first.
- ``save_state`` / ``load_state``: a small pickled state (weights, optimizer, epoch, settings)
  written atomically, and a damaged one refused with one line naming the file.

State in a checkpoint folder (``toto.train.checkpoint``, ``toto.tasks.base.RunState``) is written
through ``toto.ioutil``'s folder swap and checksums instead.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, ConfigError
from .ioutil import atomic_write_bytes, read_jsonl

_MISSING = "(unset)"


def changed_settings(saved: dict, given: dict, skip: tuple[str, ...] = (), ignore_none: bool = False,
                     prefix: str = "") -> list[str]:
    """``"a.b (old -> new)"`` for each (nested) entry where ``saved`` and ``given`` differ.
    ``skip``: dotted names not compared; ``ignore_none``: a ``None`` in ``given`` means "not
    set" (keep the saved value), not a change."""
    out = []
    for k in sorted(set(saved) | set(given), key=str):
        name = f"{prefix}{k}"
        if name in skip:
            continue
        a, b = saved.get(k, _MISSING), given.get(k, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, skip, ignore_none, f"{name}.")
        elif a != b and not (ignore_none and b is None):
            out.append(f"{name} ({_short(a)} -> {_short(b)})")
    return out


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def refuse_changed(saved: dict, given: dict, where, skip: tuple[str, ...] = (), ignore_none: bool = False) -> None:
    """ConfigError, one line, when ``given`` settings differ from those the run ``where`` (e.g.
    "--resume: OUT") was started with (compared as JSON stores them: tuples and lists alike)."""
    saved, given = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(given, default=str))
    changed = changed_settings(saved, given, skip, ignore_none)
    if changed:
        raise ConfigError(f"{where} was started with other settings: {', '.join(changed)}; resume with the "
                          f"original ones or start a new run (another --out)")


def trim_metrics(path: str | Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite the log ``path`` (atomically) with only the records ``keep`` accepts: those up to
    the resumed state (and other runs' records when several share the file)."""
    path = Path(path)
    if path.exists():
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)).encode())


def save_state(path: str | Path, state: dict) -> None:
    """``torch.save`` of ``state``, written all or nothing."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, map_location=None) -> dict:
    """A state ``save_state`` wrote; CheckpointError naming the file when it is damaged."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:  # a truncated file
        raise CheckpointError(f"{path}: unreadable job state ({e}); delete it to start the run over") from None
