"""Data parallelism with PyTorch's own engine: torchrun + DDP or FSDP2 (`fully_shard` per block).

NCCL on GPU, gloo on CPU. Checkpoints go through full (unsharded) state dicts, so a run saved
by N ranks resumes on any other number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # in a process group (torchrun), even of one rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (no-op when run alone).
    ``torchrun --nproc_per_node 1`` joins a group of one, so DDP/FSDP and the backend run for
    real on a single GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not {"RANK", "MASTER_ADDR"} <= os.environ.keys():
        return DistInfo(), resolve_device(device_pref)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, enabled=True), device


def wrap_model(model: torch.nn.Module, mode: str, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP wraps the whole model; FSDP2 shards each block, then the root (embeddings, head)."""
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ConfigError(f"train.parallel must be ddp or fsdp, got {mode!r}")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks, in place (unchanged when run alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    return all_sum(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
