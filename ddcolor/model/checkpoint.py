"""Our own generator checkpoints: `NAME.safetensors` (weights) plus `NAME.json` (architecture config).

The JSON is also embedded in the safetensors metadata, so a lone `.safetensors` file still loads.
`load_model` turns a release name or a file (one of our checkpoints, or an official `.pth`) into a ready model; it is
the file branch of `ddcolor.model.load.load_generator`, which also takes ``models:/`` URIs and random-init specs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

import ddcolor
from ddcolor.model.convert import CheckpointError, convert_official_state_dict, read_checkpoint
from ddcolor.model.ddcolor import DDColor, DDColorConfig
from ddcolor.model.encoder import Encoder
from ddcolor.storage import write_local_atomic

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "checkpoint_run_id", "load_checkpoint", "load_model", "save_checkpoint"]

log = logging.getLogger(__name__)

FORMAT_NAME = "ddcolor-generator"
FORMAT_VERSION = 1


def save_checkpoint(model: DDColor, path: str | Path, extra: dict | None = None) -> Path:
    """Save `model` as `path` (.safetensors) plus its JSON config beside it; both written atomically.

    Args:
        model: the generator (unwrap DDP / torch.compile first).
        path: target file; the suffix is forced to `.safetensors`.
        extra: small JSON-serialisable metadata to keep with it (e.g. run id, step).

    Returns:
        The path of the `.safetensors` file.
    """
    path = Path(path).with_suffix(".safetensors")
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ddcolor_version": ddcolor.__version__,
        "config": asdict(model.config),
        "extra": extra or {},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_local_atomic(path, lambda tmp: save_file(state, tmp, metadata={"ddcolor": json.dumps(config)}))
    write_local_atomic(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return path


def _read_config(path: Path) -> dict:
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "ddcolor" not in metadata:
        raise CheckpointError(
            f"{path}: no model config (neither {sidecar.name} nor safetensors metadata); "
            "if it is an official checkpoint, load it with `load_official` or pass a `.pth`"
        )
    return json.loads(metadata["ddcolor"])


def checkpoint_run_id(path: str | Path) -> str | None:
    """The MLflow run that trained the checkpoint at `path` (its ``extra.run_id``), or None (untracked, official).

    Only our ``.safetensors`` files record one; anything else (release names, ``.pth``, missing files) gives None.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        run_id = _read_config(path).get("extra", {}).get("run_id")
    except (CheckpointError, OSError, ValueError):
        return None
    return str(run_id) if run_id else None


def _verify_training_file(path: Path) -> None:
    """A generator inside a training checkpoint's step folder (its ``meta.json`` records the file's sha256 and
    size, `ddcolor.train.checkpoint`): check it before use. Files without such a record are not checked.

    Raises:
        CheckpointError: the file differs from its record (names the file, the step and what to use instead).
    """
    meta_path = path.parent / "meta.json"
    if not meta_path.is_file():
        return
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s: cannot read %s to verify the file (%s); loading it unverified", path, meta_path.name, err)
        return
    files = meta.get("files") if isinstance(meta, dict) else None
    record = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(record, dict):
        return
    size = path.stat().st_size
    if "bytes" in record and size != int(record["bytes"]):
        problem = f"size {size} bytes, recorded {record['bytes']} (truncated or overwritten)"
    else:
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        problem = "sha256 differs from the recorded one" if digest != record.get("sha256", digest) else None
    if problem:
        raise CheckpointError(
            f"{path}: damaged training checkpoint file (step {meta.get('step', '?')}): {problem}; use another step "
            f"folder under {path.parent.parent} or the run's model.safetensors"
        )


def load_checkpoint(path: str | Path) -> DDColor:
    """Load one of our `.safetensors` checkpoints (strict: every key and shape must match).

    A generator of a training checkpoint is first checked against the sha256 and size its ``meta.json`` records.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable or damaged file, unknown format version, or keys that do not fit the config.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    _verify_training_file(path)
    try:
        config = _read_config(path)
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err}); the file is truncated or corrupt") from err
    if config.get("format") != FORMAT_NAME or config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {config.get('format')!r} v{config.get('format_version')} is not supported by "
            f"ddcolor {ddcolor.__version__} (expects {FORMAT_NAME!r} <= v{FORMAT_VERSION}); upgrade ddcolor"
        )
    known = {f.name for f in fields(DDColorConfig)}
    unknown = sorted(set(config["config"]) - known)
    if unknown:
        raise CheckpointError(
            f"{path}: config fields {unknown} are unknown to ddcolor {ddcolor.__version__}; upgrade ddcolor"
        )
    arch = DDColorConfig(**config["config"])
    model = DDColor(arch, Encoder(arch.backbone, pretrained_file=None))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the config stored with them: {err}") from err
    return model


def _official_preset(state: dict[str, torch.Tensor], source: Path) -> str:
    stem = state.get("encoder.arch.downsample_layers.0.0.weight")
    presets = {96: "tiny", 192: "large"}
    if stem is None or stem.shape[0] not in presets:
        raise CheckpointError(f"{source}: not an official DDColor checkpoint (no ConvNeXt-T/L encoder keys found)")
    return presets[stem.shape[0]]


def load_model(spec: str | Path, preset: str | None = None) -> DDColor:
    """Resolve a model reference to a ready `DDColor` in eval mode.

    Args:
        spec: an official release name (`ddcolor_paper_tiny`, ...; from the weights cache), one of our
            `.safetensors` checkpoints, or an official `.pth`/`.pt`/`.bin` file.
        preset: model preset for official files; inferred from the checkpoint when None.

    Raises:
        FileNotFoundError: a path that does not exist (the message lists what `spec` may be).
        ddcolor.weights.WeightsNotFoundError: a release that is not in the cache (names the fetch command).
        CheckpointError: unreadable or non-fitting checkpoint.
    """
    from ddcolor.model import OFFICIAL_RELEASES, build_model

    name = str(spec).removeprefix("official:")
    if name in OFFICIAL_RELEASES:
        return build_model(OFFICIAL_RELEASES[name], pretrained=name).eval()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"model {spec!r} not found: expected an official release {sorted(OFFICIAL_RELEASES)} "
            "(see `ddcolor weights list`), a .safetensors checkpoint, or an official .pth file"
        )
    if path.suffix == ".safetensors":
        return load_checkpoint(path).eval()
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in read_checkpoint(path).items()}
    model = build_model(preset or _official_preset(state, path), pretrained=None)
    model.load_state_dict(convert_official_state_dict(state, model, source=str(path)), strict=True)
    return model.eval()
