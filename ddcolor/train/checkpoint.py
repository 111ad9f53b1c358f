"""Training checkpoints: everything needed to continue a run bit-for-bit, on a local folder or ``s3://`` prefix.

Layout (``ROOT`` is ``train.checkpoint_dir``, relative to the run's output folder unless absolute / S3)::

    ROOT/step_00010000/generator.safetensors      G weights, our generator format (`ddcolor.model.checkpoint`):
                                                  loads with `load_model` / ``ddcolor colorize --model``
    ROOT/step_00010000/generator_ema.safetensors  EMA of G (only with ``train.ema_decay``)
    ROOT/step_00010000/discriminator.safetensors  D weights
    ROOT/step_00010000/trainer_state.pt           optimizers, LR schedulers, grad scalers, step, and per rank:
                                                  RNG states (python, numpy, torch CPU / CUDA) and the data
                                                  loader's position (`LabDataLoader.state_dict`)
    ROOT/step_00010000/meta.json                  step, resolved config, losses, git SHA, dataset version, files
    ROOT/latest.json                              pointer to the newest complete checkpoint, written LAST

Atomicity: every file is written atomically (`ddcolor.storage`: temp file + rename locally, one PUT / multipart
upload on S3), and ``latest.json`` is only written after all files of its step exist. A run killed at any moment
leaves ``latest.json`` pointing at a complete checkpoint (or absent). Old step folders beyond ``keep_last`` are
deleted only after the new pointer is written.

``trainer_state.pt`` is a pickle (``torch.load(weights_only=False)``): load only checkpoints you wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import ddcolor
from ddcolor import storage
from ddcolor.model.checkpoint import FORMAT_NAME as GENERATOR_FORMAT
from ddcolor.model.checkpoint import FORMAT_VERSION as GENERATOR_FORMAT_VERSION

__all__ = [
    "DISCRIMINATOR_FILE",
    "EMA_FILE",
    "GENERATOR_FILE",
    "LATEST_NAME",
    "META_FILE",
    "STATE_FILE",
    "LoadedCheckpoint",
    "capture_rng_state",
    "find_latest",
    "generator_bytes",
    "load_training_checkpoint",
    "restore_rng_state",
    "save_training_checkpoint",
    "step_dir_name",
]

log = logging.getLogger(__name__)

LATEST_NAME = "latest.json"
GENERATOR_FILE = "generator.safetensors"
EMA_FILE = "generator_ema.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
STATE_FORMAT = "ddcolor-train-state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    """``step_00010000``: zero-padded so that names sort by step."""
    return f"step_{step:08d}"


# --- RNG -------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and, if initialised, every CUDA device) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only if this process has as many devices)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- writing ---------------------------------------------------------------------------------------------------


def _state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def generator_bytes(model: nn.Module, extra: dict[str, Any] | None = None) -> bytes:
    """The generator as our ``.safetensors`` format (config embedded in the metadata), as bytes.

    Args:
        model: the unwrapped, uncompiled `DDColor` (no ``module.`` / ``_orig_mod.`` prefixes).
        extra: small JSON-serialisable metadata (step, run id, ...).
    """
    config = {
        "format": GENERATOR_FORMAT,
        "format_version": GENERATOR_FORMAT_VERSION,
        "ddcolor_version": ddcolor.__version__,
        "config": asdict(model.config),
        "extra": extra or {},
    }
    return save_safetensors(_state_dict_cpu(model), metadata={"ddcolor": json.dumps(config)})


def _discriminator_bytes(model: nn.Module) -> bytes:
    meta = {"format": "ddcolor-discriminator", "format_version": 1, "ddcolor_version": ddcolor.__version__}
    return save_safetensors(_state_dict_cpu(model), metadata={"ddcolor": json.dumps(meta)})


def _put(uri: str, data: bytes) -> None:
    """Write ``data`` atomically; large S3 objects go through a temp file and a multipart upload."""
    if storage.is_s3(uri) and len(data) > storage.SINGLE_PUT_MAX_BYTES:
        with tempfile.TemporaryDirectory(prefix="ddcolor-ckpt-") as tmp:
            path = os.path.join(tmp, "part")
            with open(path, "wb") as fh:
                fh.write(data)
            storage.upload_file(path, uri)
        return
    storage.write_bytes(uri, data)


def save_training_checkpoint(
    root: str,
    step: int,
    *,
    generator: nn.Module,
    discriminator: nn.Module,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    ema: nn.Module | None = None,
    keep_last: int | None = 3,
) -> str:
    """Write one complete checkpoint under ``root`` and then point ``latest.json`` at it.

    Args:
        root: local folder or ``s3://`` prefix.
        step: optimizer steps completed.
        generator, discriminator, ema: unwrapped modules (EMA optional).
        trainer_state: optimizers, schedulers, scalers, per-rank RNG / loader states (pickled by torch).
        meta: JSON-serialisable facts about the run (config, losses, dataset version, ...).
        keep_last: keep this many newest step folders (older ones are deleted after the pointer is written);
            None keeps all.

    Returns:
        The URI of the step folder.
    """
    folder = storage.join(root, step_dir_name(step))
    started = time.perf_counter()
    files = {GENERATOR_FILE: generator_bytes(generator, {"step": step})}
    if ema is not None:
        files[EMA_FILE] = generator_bytes(ema, {"step": step, "ema": True})
    files[DISCRIMINATOR_FILE] = _discriminator_bytes(discriminator)
    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "format_version": STATE_VERSION, "step": step, **trainer_state}, buffer)
    files[STATE_FILE] = buffer.getvalue()
    meta = {"step": step, "files": [*files, META_FILE], "ddcolor_version": ddcolor.__version__, **meta}
    files[META_FILE] = (json.dumps(meta, indent=2, default=str) + "\n").encode()
    for name, data in files.items():
        _put(storage.join(folder, name), data)
    # the pointer goes last: a reader (or --resume) never sees a partial checkpoint
    pointer = {"step": step, "dir": step_dir_name(step), "files": list(files), "time": time.time()}
    storage.write_json(storage.join(root, LATEST_NAME), pointer)
    size_mib = sum(len(d) for d in files.values()) / 2**20
    log.info("checkpoint step %d: %s (%.1f MiB, %.1f s)", step, folder, size_mib, time.perf_counter() - started)
    if keep_last is not None:
        _prune(root, keep=keep_last, current=step)
    return folder


def _step_folders(root: str) -> dict[int, list[str]]:
    """``{step: [file URIs]}`` of the step folders under ``root``."""
    try:
        uris = storage.list_files(root)
    except storage.StorageNotFoundError:
        return {}
    prefix = storage.join(root, "")  # normalised like the listed URIs (no trailing slash)
    out: dict[int, list[str]] = {}
    for uri in uris:
        parts = uri[len(prefix) :].lstrip("/").split("/") if uri.startswith(prefix) else []
        match = _STEP_DIR.match(parts[0]) if len(parts) == 2 else None
        if match:
            out.setdefault(int(match.group(1)), []).append(uri)
    return out


def _prune(root: str, keep: int, current: int) -> None:
    folders = _step_folders(root)
    old = sorted(s for s in folders if s != current)[: max(0, len(folders) - max(keep, 1))]
    for step in old:
        for uri in folders[step]:
            storage.delete(uri)
        if not storage.is_s3(root):
            with contextlib.suppress(OSError):
                os.rmdir(storage.join(root, step_dir_name(step)))
        log.debug("deleted old checkpoint step %d", step)


# --- reading ---------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A training checkpoint read back.

    Attributes:
        uri: the step folder.
        step: optimizer steps completed.
        generator: G state dict (CPU tensors).
        discriminator: D state dict.
        ema: EMA-of-G state dict, or None.
        state: ``trainer_state.pt`` (optimizers, schedulers, scalers, ``world_size``, ``ranks``).
        meta: ``meta.json``.
    """

    uri: str
    step: int
    generator: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    meta: dict[str, Any]


def find_latest(root: str) -> str | None:
    """The step folder ``latest.json`` under ``root`` points at, or None when there is none yet."""
    pointer_uri = storage.join(root, LATEST_NAME)
    if not storage.exists(pointer_uri):
        return None
    pointer = storage.read_json(pointer_uri)
    if not isinstance(pointer, dict) or not isinstance(pointer.get("dir"), str):
        raise ValueError(f"{pointer_uri}: not a checkpoint pointer (expected {{'step', 'dir', 'files'}})")
    return storage.join(root, pointer["dir"])


def load_training_checkpoint(folder: str) -> LoadedCheckpoint:
    """Read a step folder written by `save_training_checkpoint`.

    Raises:
        ValueError: missing files or an unknown state format (the message names the folder).
    """
    meta = storage.read_json(storage.join(folder, META_FILE))
    missing = [f for f in meta.get("files", []) if not storage.exists(storage.join(folder, f))]
    if missing:
        raise ValueError(f"{folder}: incomplete checkpoint, missing {missing}")
    state = torch.load(
        io.BytesIO(storage.read_bytes(storage.join(folder, STATE_FILE))), map_location="cpu", weights_only=False
    )
    if state.get("format") != STATE_FORMAT or state.get("format_version", 0) > STATE_VERSION:
        raise ValueError(
            f"{folder}/{STATE_FILE}: format {state.get('format')!r} v{state.get('format_version')} is not "
            f"supported (expects {STATE_FORMAT!r} <= v{STATE_VERSION})"
        )
    ema_uri = storage.join(folder, EMA_FILE)
    return LoadedCheckpoint(
        uri=folder,
        step=int(state["step"]),
        generator=load_safetensors(storage.read_bytes(storage.join(folder, GENERATOR_FILE))),
        discriminator=load_safetensors(storage.read_bytes(storage.join(folder, DISCRIMINATOR_FILE))),
        ema=load_safetensors(storage.read_bytes(ema_uri)) if EMA_FILE in meta.get("files", []) else None,
        state=state,
        meta=meta,
    )
