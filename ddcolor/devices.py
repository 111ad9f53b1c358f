"""The one device choice: a device name (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) -> a `torch.device`.

Used by colorization (``--device``), training (``train.device``, one GPU per DDP process), evaluation and the
MLflow serving model, so "auto" means the same everywhere: CUDA, then Apple MPS, then CPU.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICES", "resolve_device"]

#: Device kinds accepted (``cuda`` also as ``cuda:N``).
DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The `torch.device` for `name`; ``auto`` (or None) picks CUDA, then MPS, then CPU.

    Args:
        name: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` (or a `torch.device`, returned as is).
        local_rank: under DDP, the process's GPU on its node (``LOCAL_RANK``): a bare ``cuda`` (or ``auto`` on a
            CUDA machine) becomes ``cuda:<local_rank>``; an explicit ``cuda:N`` is kept.

    Raises:
        ValueError: an unknown name, or CUDA / MPS requested on a machine without it (the message says what to use).
    """
    if isinstance(name, torch.device):
        return name
    name = "auto" if name is None else str(name)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu (or auto)")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but Apple MPS is not available here; use cpu (or auto)")
    return torch.device(name)
