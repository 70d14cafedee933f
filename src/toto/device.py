"""The one device rule: ``auto`` means CUDA when there is one; asking for CUDA without one is an error."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; a bare ``cuda`` under torchrun is this rank's GPU."""
    if str(name) == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev
