"""Process-group setup for multi-GPU / multi-node training launched by ``torchrun``.

``torchrun --nproc-per-node 4 -m ddcolor.cli train ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` for every process; `setup_distributed` reads them and joins the group
(NCCL on CUDA, gloo on CPU). Without ``WORLD_SIZE`` (or with 1) it is a single process and nothing is initialised.

Only rank 0 logs to the tracker, draws the progress bar and writes checkpoints (`DistInfo.is_main`).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddcolor.devices import resolve_device

__all__ = [
    "DistInfo",
    "all_gather_object",
    "barrier",
    "cleanup_distributed",
    "get_world_size",
    "resolve_device",
    "setup_distributed",
]

log = logging.getLogger(__name__)

#: How long a collective may wait for the slowest rank (first batches, checkpoint uploads) before failing.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        local_rank: rank on this node (the CUDA device index).
        world_size: number of processes.
        device: the device this process trains on.
        backend: ``"nccl"`` / ``"gloo"``, or None for a single process.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op for a single process).

    Args:
        device: ``train.device`` (see `resolve_device`).

    Returns:
        This process's `DistInfo`. On CUDA, the current CUDA device is set to it.

    Raises:
        ValueError: inconsistent ``RANK`` / ``WORLD_SIZE``, or an unavailable device.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistInfo(0, 0, 1, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world_size, "timeout": TIMEOUT}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator now (no lazy init on the first collective)
        dist.init_process_group(**kwargs)
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, dev, backend)
    return DistInfo(rank, local_rank, world_size, dev, backend)


def cleanup_distributed() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
