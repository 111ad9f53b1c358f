"""Training checkpoints: everything needed to continue a run bit-for-bit, on a local folder or ``s3://`` prefix.

Layout (``ROOT`` is ``train.checkpoint_dir``, relative to the run's output folder unless absolute / S3)::

    ROOT/step_00010000/generator.safetensors      G weights, our generator format (`ddcolor.model.checkpoint`):
                                                  loads with `load_model` / ``ddcolor colorize --model``
    ROOT/step_00010000/generator_ema.safetensors  EMA of G (only with ``train.ema_decay``)
    ROOT/step_00010000/discriminator.safetensors  D weights
    ROOT/step_00010000/trainer_state.pt           optimizers, LR schedulers, grad scalers, step, and per rank:
                                                  RNG states (python, numpy, torch CPU / CUDA, as tensors) and the
                                                  data loader's position (`LabDataLoader.state_dict`)
    ROOT/step_00010000/meta.json                  step, resolved config, losses, git SHA, dataset version, and the
                                                  sha256 + size of every other file of the step (written last)
    ROOT/latest.json                              pointer to the newest complete checkpoint, with the sha256 + size
                                                  of every file of that step (meta.json too), written LAST

Atomicity: every file is written atomically (`ddcolor.storage`: temp file + rename locally, one PUT / multipart
upload on S3), and ``latest.json`` is only written after all files of its step exist. A run killed at any moment,
or a write that fails (disk full), leaves ``latest.json`` pointing at the previous complete checkpoint (or absent);
a failed write raises `CheckpointWriteError` and removes the step's partial files. Old step folders beyond
``keep_last`` are deleted only after the new pointer is written.

Integrity: `resume_checkpoint` checks every file against the recorded sha256 and size before using it. A damaged
newest checkpoint (truncated, bit-flipped, missing file, unreadable) is named with its step and file, and the run
falls back to the newest intact older one with a loud warning (``strict=True``, ``--resume-strict``: fail instead).

No code runs on load: ``trainer_state.pt`` holds only tensors and plain Python containers / numbers / strings and
is read with ``torch.load(weights_only=True)``; a pickle that needs anything else is refused (`CheckpointCorruptError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

import ddcolor
from ddcolor import storage
from ddcolor.errors import DDColorError
from ddcolor.model.checkpoint import FORMAT_NAME as GENERATOR_FORMAT
from ddcolor.model.checkpoint import FORMAT_VERSION as GENERATOR_FORMAT_VERSION
from ddcolor.model.convert import CheckpointError

__all__ = [
    "DISCRIMINATOR_FILE",
    "EMA_FILE",
    "GENERATOR_FILE",
    "LATEST_NAME",
    "META_FILE",
    "STATE_FILE",
    "CheckpointCorruptError",
    "CheckpointWriteError",
    "LoadedCheckpoint",
    "NoIntactCheckpointError",
    "capture_rng_state",
    "file_record",
    "find_latest",
    "generator_bytes",
    "load_training_checkpoint",
    "restore_rng_state",
    "resume_checkpoint",
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
#: v2: RNG states as tensors (no numpy objects): the whole state loads with ``weights_only=True``.
STATE_VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointCorruptError(CheckpointError):
    """A training checkpoint file is missing, damaged (size / sha256 differ from the record) or refused.

    Attributes:
        folder: the step folder. step: its step (None if unknown). file: the file at fault (None: the folder).
    """

    def __init__(self, folder: str, step: int | None, file: str | None, reason: str) -> None:
        self.folder, self.step, self.file, self.reason = folder, step, file, reason
        where = storage.join(folder, file) if file else folder
        super().__init__(f"checkpoint step {step if step is not None else '?'}: {where}: {reason}")


class NoIntactCheckpointError(CheckpointError):
    """``--resume`` found checkpoints, but none of them is intact."""


class CheckpointWriteError(DDColorError, RuntimeError):
    """A checkpoint could not be written (disk full, permissions, S3); the previous checkpoint is untouched."""


def step_dir_name(step: int) -> str:
    """``step_00010000``: zero-padded so that names sort by step."""
    return f"step_{step:08d}"


def file_record(data: bytes) -> dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of a file's content (what meta.json / latest.json record)."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _mismatch(data: bytes, expected: Mapping[str, Any]) -> str | None:
    """Why ``data`` does not match its record (None when it does)."""
    if "bytes" in expected and len(data) != int(expected["bytes"]):
        return f"size {len(data)} bytes, recorded {expected['bytes']} (truncated or overwritten)"
    if "sha256" in expected and hashlib.sha256(data).hexdigest() != expected["sha256"]:
        return "sha256 differs from the recorded one (the file is damaged)"
    return None


# --- RNG -------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU and, if initialised, every CUDA device) RNG states.

    Stored as tensors and plain numbers only (no numpy objects), so that the checkpoint loads with
    ``torch.load(weights_only=True)``.
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state` (CUDA states only if this process has as many devices).

    Also reads the v1 layout (``random.getstate()`` / ``np.random.get_state()`` tuples as they were).
    """
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    nps = state["numpy"]
    if isinstance(nps, dict):
        key = nps["key"].numpy().astype(np.uint32)
        nps = (nps["bit_generator"], key, nps["pos"], nps["has_gauss"], nps["gauss"])
    np.random.set_state(nps)
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


def _read_pointer(root: str) -> dict[str, Any] | None:
    """``latest.json`` under ``root`` (None when absent).

    Raises:
        CheckpointCorruptError: unreadable or not a pointer.
    """
    uri = storage.join(root, LATEST_NAME)
    try:
        if not storage.exists(uri):
            return None
        pointer = storage.read_json(uri)
    except (storage.StorageError, OSError, ValueError) as err:
        raise CheckpointCorruptError(root, None, LATEST_NAME, f"unreadable ({err})") from None
    if not isinstance(pointer, dict) or not isinstance(pointer.get("dir"), str) or "step" not in pointer:
        raise CheckpointCorruptError(root, None, LATEST_NAME, "not a checkpoint pointer (expected step, dir, files)")
    return pointer


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
        trainer_state: optimizers, schedulers, scalers, per-rank RNG / loader states: tensors and plain Python
            values only (it is read back with ``weights_only=True``).
        meta: JSON-serialisable facts about the run (config, losses, dataset version, ...).
        keep_last: keep this many newest step folders up to ``step`` (older ones are deleted after the pointer is
            written, as are folders of later steps: an abandoned timeline); None keeps all.

    Returns:
        The URI of the step folder.

    Raises:
        CheckpointWriteError: a file or the pointer could not be written (disk full, ...). The step's partial files
            are removed and ``latest.json`` still points at the previous checkpoint.
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
    records = {name: file_record(data) for name, data in files.items()}
    meta = {"step": step, "files": records, "ddcolor_version": ddcolor.__version__, **meta}
    files[META_FILE] = (json.dumps(meta, indent=2, default=str) + "\n").encode()  # last: its presence = complete
    records[META_FILE] = file_record(files[META_FILE])
    written: list[str] = []
    try:
        for name, data in files.items():
            uri = storage.join(folder, name)
            written.append(uri)
            _put(uri, data)
        # the pointer goes last: a reader (or --resume) never sees a partial checkpoint
        pointer = {"step": step, "dir": step_dir_name(step), "files": records, "time": time.time()}
        storage.write_json(storage.join(root, LATEST_NAME), pointer)
    except (OSError, storage.StorageError) as err:
        _remove_partial(root, folder, written)
        previous = _previous_description(root)
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} to {folder}: {err}; {previous}. Free space (or fix access) "
            "and rerun with --resume"
        ) from err
    size_mib = sum(len(d) for d in files.values()) / 2**20
    log.info("checkpoint step %d: %s (%.1f MiB, %.1f s)", step, folder, size_mib, time.perf_counter() - started)
    if keep_last is not None:
        _prune(root, keep=keep_last, current=step)
    return folder


def _previous_description(root: str) -> str:
    try:
        pointer = _read_pointer(root)
    except CheckpointCorruptError:
        pointer = None
    if pointer is None:
        return "no earlier checkpoint exists"
    return f"{storage.join(root, LATEST_NAME)} still points at the intact step {pointer['step']}"


def _remove_partial(root: str, folder: str, uris: list[str]) -> None:
    """Best effort: delete what a failed write left of ``folder`` (never the folder the pointer names)."""
    with contextlib.suppress(CheckpointCorruptError):
        pointer = _read_pointer(root)
        if pointer is not None and storage.join(root, pointer["dir"]) == folder:
            return
    for uri in uris:
        with contextlib.suppress(OSError, storage.StorageError):
            storage.delete(uri)
    if not storage.is_s3(folder):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


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
    """Keep the ``keep`` newest step folders up to ``current``; delete older ones and any of a later step."""
    folders = _step_folders(root)
    older = sorted(s for s in folders if s < current)
    doomed = older[: max(0, len(older) - max(keep - 1, 0))]
    later = [s for s in folders if s > current]
    if later:
        log.warning("deleting checkpoints of steps %s: later than the run's step %d (abandoned)", later, current)
    for step in doomed + later:
        for uri in folders[step]:
            storage.delete(uri)
        if not storage.is_s3(root):
            with contextlib.suppress(OSError):
                os.rmdir(storage.join(root, step_dir_name(step)))
        log.debug("deleted checkpoint step %d", step)


# --- reading ---------------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A training checkpoint read back (every file verified against its recorded sha256 and size).

    Attributes:
        uri: the step folder.
        step: optimizer steps completed.
        generator: G state dict (CPU tensors).
        discriminator: D state dict.
        ema: EMA-of-G state dict, or None.
        state: ``trainer_state.pt`` (optimizers, schedulers, scalers, ``world_size``, ``ranks``).
        meta: ``meta.json``.
        skipped: the damaged newer checkpoints `resume_checkpoint` passed over (empty when it took the newest).
    """

    uri: str
    step: int
    generator: dict[str, torch.Tensor]
    discriminator: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    state: dict[str, Any]
    meta: dict[str, Any]
    skipped: tuple[CheckpointCorruptError, ...] = ()


def find_latest(root: str) -> str | None:
    """The step folder ``latest.json`` under ``root`` points at, or None when there is none yet (not verified).

    Raises:
        CheckpointCorruptError: ``latest.json`` is unreadable.
    """
    pointer = _read_pointer(root)
    return None if pointer is None else storage.join(root, pointer["dir"])


def _step_of(folder: str) -> int | None:
    match = _STEP_DIR.match(folder.rstrip("/").rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1])
    return int(match.group(1)) if match else None


def _v1_safe_globals() -> list[Any]:
    """The exact numpy types a v1 ``trainer_state.pt`` (numpy RNG state as an array) needs; nothing callable else."""
    from numpy._core.multiarray import _reconstruct

    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _load_state(data: bytes, folder: str, step: int | None) -> dict[str, Any]:
    """``trainer_state.pt`` with ``weights_only=True``: tensors and plain containers only, no code runs."""
    try:
        with torch.serialization.safe_globals(_v1_safe_globals()):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign globals; RuntimeError / EOFError for damaged bytes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointCorruptError(
            folder, step, STATE_FILE, f"refused or unreadable, nothing in it was run ({type(err).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointCorruptError(folder, step, STATE_FILE, f"not a ddcolor trainer state ({STATE_FORMAT!r})")
    if state.get("format_version", 0) > STATE_VERSION:
        raise CheckpointError(
            f"{storage.join(folder, STATE_FILE)}: format v{state.get('format_version')} is newer than this ddcolor "
            f"supports (<= v{STATE_VERSION}); upgrade ddcolor"
        )
    return state


def load_training_checkpoint(folder: str, expected: Mapping[str, Any] | None = None) -> LoadedCheckpoint:
    """Read and verify a step folder written by `save_training_checkpoint`.

    Args:
        folder: the step folder.
        expected: ``{file: {"sha256", "bytes"}}`` from ``latest.json`` (checks meta.json too); None: the records
            in meta.json only.

    Raises:
        CheckpointCorruptError: a missing, damaged, unreadable or refused file (names the file and the step).
        CheckpointError: a state written by a newer ddcolor.
    """
    step = _step_of(folder)
    expected = dict(expected or {})

    def read(name: str) -> bytes:
        try:
            data = storage.read_bytes(storage.join(folder, name))
        except storage.StorageNotFoundError:
            raise CheckpointCorruptError(folder, step, name, "missing") from None
        except (storage.StorageError, OSError) as err:
            raise CheckpointCorruptError(folder, step, name, f"unreadable ({err})") from None
        record = expected.get(name)
        problem = _mismatch(data, record) if isinstance(record, Mapping) else None
        if problem:
            raise CheckpointCorruptError(folder, step, name, problem)
        return data

    try:
        meta = json.loads(read(META_FILE))
    except ValueError as err:
        raise CheckpointCorruptError(folder, step, META_FILE, f"not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointCorruptError(folder, step, META_FILE, "not a JSON object")
    step = int(meta.get("step", step if step is not None else -1))
    listed = meta.get("files", [])
    if isinstance(listed, dict):  # v2: {name: record}; the pointer's records (if any) win
        expected = {**listed, **expected}
    else:
        log.info("%s: written by an older ddcolor without checksums; only checking that its files exist", folder)
    names = [n for n in listed if n != META_FILE]
    data = {name: read(name) for name in names}
    for name in (GENERATOR_FILE, DISCRIMINATOR_FILE, STATE_FILE):
        if name not in data:
            data[name] = read(name)

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors(data[name])
        except Exception as err:  # SafetensorError and friends: the bytes are not a safetensors file
            raise CheckpointCorruptError(folder, step, name, f"not a readable safetensors file ({err})") from None

    state = _load_state(data[STATE_FILE], folder, step)
    return LoadedCheckpoint(
        uri=folder,
        step=int(state["step"]),
        generator=tensors(GENERATOR_FILE),
        discriminator=tensors(DISCRIMINATOR_FILE),
        ema=tensors(EMA_FILE) if EMA_FILE in data else None,
        state=state,
        meta=meta,
    )


def resume_checkpoint(root: str, *, strict: bool = False) -> LoadedCheckpoint | None:
    """The newest intact checkpoint under ``root``, verified; None when there is none to resume from.

    Starts at the step ``latest.json`` names (checked against the pointer's records), then tries older step
    folders newest first (each against its own meta.json). Folders without meta.json are interrupted writes and
    skipped. Every damaged checkpoint passed over is logged as a warning naming the file and the step.

    Args:
        root: the checkpoint folder or ``s3://`` prefix.
        strict: raise on the first damaged checkpoint instead of falling back (``--resume-strict``).

    Raises:
        CheckpointCorruptError: ``strict`` and the newest checkpoint (or the pointer) is damaged.
        NoIntactCheckpointError: checkpoints exist but none is intact.
    """
    skipped: list[CheckpointCorruptError] = []

    def damaged(err: CheckpointCorruptError) -> None:
        if strict:
            raise CheckpointCorruptError(
                err.folder,
                err.step,
                err.file,
                f"{err.reason}; --resume-strict does not fall back (plain --resume continues from the newest intact "
                "checkpoint)",
            ) from None
        skipped.append(err)
        log.warning("DAMAGED CHECKPOINT, skipped: %s", err)

    try:
        pointer = _read_pointer(root)
    except CheckpointCorruptError as err:
        damaged(err)
        pointer = None
    folders = _step_folders(root)
    candidates: list[tuple[str, Mapping[str, Any] | None]] = []
    if pointer is not None:
        head = int(pointer["step"])
        records = pointer.get("files")
        candidates.append((storage.join(root, pointer["dir"]), records if isinstance(records, dict) else None))
        older = sorted((s for s in folders if s < head), reverse=True)
    else:
        older = sorted(folders, reverse=True)
    meta_name = "/" + META_FILE
    for step in older:
        if any(uri.replace(os.sep, "/").endswith(meta_name) for uri in folders[step]):
            candidates.append((storage.join(root, step_dir_name(step)), None))
        else:
            log.info("checkpoint step %d under %s has no %s (interrupted write): skipped", step, root, META_FILE)
    if not candidates and not skipped:
        return None
    for folder, expected in candidates:
        try:
            loaded = load_training_checkpoint(folder, expected)
        except CheckpointCorruptError as err:
            damaged(err)
            continue
        if skipped:
            log.warning(
                "FELL BACK to checkpoint step %d (%s): %d newer checkpoint(s) damaged (see above); the steps after %d "
                "are trained again",
                loaded.step,
                folder,
                len(skipped),
                loaded.step,
            )
        loaded.skipped = tuple(skipped)
        return loaded
    newest = skipped[0] if skipped else None
    raise NoIntactCheckpointError(
        f"no intact checkpoint under {root} ({len(skipped)} damaged; newest: {newest}); restore the folder from a "
        "backup, or start afresh without --resume (or in another --out)"
    )
