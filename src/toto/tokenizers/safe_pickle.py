"""Read third-party ``torch.save`` files (DALL-E pickles, Lightning checkpoints) without running them.

Such files reference classes of packages we do not install (``dall_e``, ``pytorch_lightning``,
``omegaconf``) and, loaded normally, let the pickle call any function. ``torch.load`` with
``weights_only=True`` is not enough for them: it refuses unknown classes and cannot fill
dict-like objects such as Lightning's ``AttributeDict``. Here ``torch.load`` runs with a
restricted unpickler instead: the only callables it resolves are torch's tensor/parameter rebuild
functions, storage types, dtypes, ``torch.device``/``torch.Size``, ``OrderedDict`` and ``set``;
every class of an allowed foreign package becomes an inert ``Holder`` that just keeps its state
and arguments, and anything else in the pickle is refused before it can run.
"""

from __future__ import annotations

import pickle
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import DataError

_ALLOWED_TORCH_UTILS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                        "_rebuild_parameter_with_state"}


class Holder:
    """Stands in for a pickled object of a foreign class; keeps its state and its class name."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):  # NEWOBJ and REDUCE both end up here: never runs foreign code
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __setitem__(self, key, value):  # dict subclasses (Lightning's AttributeDict) are filled item by item
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):  # list subclasses
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        for v in values:
            self.append(v)

    def __repr__(self):
        return f"<{self.qualname}>"


def _holder_class(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Holder,), {"qualname": qualname})


def _device(*args):
    return str(args[0]) if args else "cpu"


class _Unpickler(pickle.Unpickler):
    where = ""
    inert: tuple[str, ...] = ()  # module prefixes whose classes become holders
    hint = ""

    def find_class(self, module: str, name: str):
        if module in ("__builtin__", "builtins") and name == "set":
            return set
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in _ALLOWED_TORCH_UTILS:
            return getattr(torch._utils, name)
        if module == "torch" and name == "device":
            return _device
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if any(module == p.rstrip(".") or module.startswith(p) for p in self.inert):
            return _holder_class(f"{module}.{name}")
        raise DataError(f"{self.where}: refusing to load {module}.{name} from the pickle ({self.hint})")


def _pickle_module(where: str, inert: tuple[str, ...], hint: str) -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``."""
    mod = types.ModuleType("toto_safe_pickle")
    unpickler = type("Unpickler", (_Unpickler,), {"where": where, "inert": inert, "hint": hint})
    mod.Unpickler = unpickler
    mod.load = lambda f, **kw: unpickler(f, **kw).load()
    mod.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL")})
    return mod


def restricted_load(path: str | Path, what: str, inert: tuple[str, ...], hint: str):
    """``torch.load`` of ``path`` (zip or legacy format) with the restricted unpickler.

    ``what`` names the expected content in messages ("dall-e encoder"); ``inert`` lists module prefixes (e.g.
    ``"dall_e."``) whose classes become holders; ``hint`` says what the file should hold when
    something else is refused. Zip files are memory-mapped, so tensors that are not used are
    never read. A missing, empty or unreadable file is a one-line ``DataError``.
    """
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file, expected a {what}")
    try:
        with warnings.catch_warnings():  # legacy-format files warn that the classes' source is unavailable
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", pickle_module=_pickle_module(str(path), inert, hint),
                              weights_only=False, mmap=zipfile.is_zipfile(path))
    except DataError:
        raise
    except Exception as e:  # torch raises many types for a non-pickle / truncated file
        raise DataError(f"{path}: cannot be read as a torch.save file of a {what} "
                        f"({type(e).__name__}: {e})") from None


def holder_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a tree of pickled ``nn.Module`` holders, named as
    ``nn.Module.state_dict`` would name them."""
    out = {}
    d = vars(obj)
    for k, v in (d.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach() if torch.is_tensor(v) else v
    for k, v in (d.get("_buffers") or {}).items():
        if v is not None and k not in (d.get("_non_persistent_buffers_set") or ()):
            out[prefix + k] = v
    for k, v in (d.get("_modules") or {}).items():
        if v is not None:
            out.update(holder_state_dict(v, f"{prefix}{k}."))
    return out
