"""Load the official DDColor release checkpoints (piddnad/DDColor) into `ddcolor.model.DDColor`.

The official state dict (`ddcolor_paper_tiny`, `ddcolor_paper`, `ddcolor_modelscope`, `ddcolor_artistic`)
is mapped key by key with one declarative table. Every official key is either mapped or dropped for a
stated reason; anything else, a missing key, or a shape mismatch is an error that names the keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ddcolor.errors import DDColorError

__all__ = ["CheckpointError", "convert_official_state_dict", "load_official", "read_checkpoint"]

log = logging.getLogger(__name__)

# (official key pattern, our key template). Applied to keys after stripping `module.` / `model.` prefixes.
_BLOCK_PARTS = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2", "gamma": "gamma"}
_KEY_MAP: list[tuple[str, str]] = [
    (r"^(mean|std)$", r"\1"),
    # ConvNeXt (Meta layout) -> timm features_only layout
    (r"^encoder\.arch\.downsample_layers\.0\.([01])\.(weight|bias)$", r"encoder.backbone.stem_\1.\2"),
    (
        r"^encoder\.arch\.downsample_layers\.([123])\.([01])\.(weight|bias)$",
        r"encoder.backbone.stages_\1.downsample.\2.\3",
    ),
    (r"^encoder\.arch\.stages\.(\d)\.(\d+)\.(dwconv|norm|pwconv1|pwconv2)\.(weight|bias)$", "block"),
    (r"^encoder\.arch\.stages\.(\d)\.(\d+)\.(gamma)$", "block"),
    # the four extra LayerNorms upstream reads through forward hooks
    (r"^encoder\.arch\.norm([0-3])\.(weight|bias)$", r"encoder.norms.\1.\2"),
    (r"^decoder\.layers\.(.+)$", r"pixel_decoder.layers.\1"),
    (r"^decoder\.last_shuf\.(.+)$", r"pixel_decoder.last_shuf.\1"),
    (r"^decoder\.color_decoder\.(.+)$", r"color_decoder.\1"),
    (r"^refine_net\.0\.0\.(.+)$", r"refine.\1"),
]
# Official keys that are deliberately not loaded, with the reason.
_DROPPED: list[tuple[str, str]] = [
    (r"^encoder\.arch\.norm\.(weight|bias)$", "final ConvNeXt norm: upstream computes it but never uses its output"),
    (r"^encoder\.arch\.head_cls\.(weight|bias)$", "classifier head of older releases (removed upstream in 1a190e2)"),
]
_WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")


class CheckpointError(DDColorError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names file and keys."""


def _map_key(key: str) -> str | None:
    for pattern, template in _KEY_MAP:
        match = re.match(pattern, key)
        if match is None:
            continue
        if template == "block":
            stage, block, part = match.group(1), match.group(2), _BLOCK_PARTS[match.group(3)]
            leaf = f".{match.group(4)}" if match.lastindex == 4 else ""
            return f"encoder.backbone.stages_{stage}.blocks.{block}.{part}{leaf}"
        return match.expand(template)
    return None


def _drop_reason(key: str) -> str | None:
    return next((reason for pattern, reason in _DROPPED if re.match(pattern, key)), None)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def read_checkpoint(path: str | Path, param_key: str = "auto") -> dict[str, torch.Tensor]:
    """Read a state dict from `.pth`/`.pt`/`.bin` (torch.load, weights_only) or `.safetensors`.

    Args:
        path: checkpoint file.
        param_key: which wrapper entry to use: "auto" takes `params_ema` if present, else `params`
            (BasicSR's layout, used by the official releases), else the dict itself.

    Returns:
        A flat {name: tensor} dict.

    Raises:
        CheckpointError: unreadable, truncated or corrupt file, or a pickle that is not a state dict.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes); re-download or re-import it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load and safetensors raise many types for damaged or foreign files; all mean "cannot read"
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            "The file is truncated, corrupt, or not a PyTorch/safetensors checkpoint; "
            "re-download it (`ddcolor weights fetch NAME`) or re-export it."
        ) from err
    return unwrap_state_dict(obj, source=str(path), param_key=param_key)


def unwrap_state_dict(obj: object, source: str = "<state dict>", param_key: str = "auto") -> dict[str, torch.Tensor]:
    """Take the state dict out of a `{"params": sd}` / `{"params_ema": sd}` wrapper, or accept it raw."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    if param_key != "auto":
        if param_key not in obj:
            raise CheckpointError(f"{source}: no entry {param_key!r}; top-level keys: {sorted(obj)[:10]}")
        obj = obj[param_key]
    else:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                log.debug("%s: using the %r entry", source, key)
                obj = obj[key]
                break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise CheckpointError(
            f"{source}: not a state dict: {'it is empty' if not obj else f'non-tensor entries such as {bad[:5]}'}"
        )
    return dict(obj)


def _guess_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    stem = state_dict.get("encoder.arch.downsample_layers.0.0.weight")
    if stem is None:
        return "unknown"
    return {96: "tiny (convnext_tiny)", 192: "large (convnext_large)"}.get(stem.shape[0], f"stem width {stem.shape[0]}")


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """Map an official DDColor state dict onto `model`'s key names, checking coverage and shapes.

    Args:
        state_dict: official keys (with or without `module.`/`model.` prefixes).
        model: the target `DDColor`; its state dict defines the expected keys and shapes.
        source: name used in error messages (usually the file path).

    Returns:
        A state dict that `model.load_state_dict(..., strict=True)` accepts.

    Raises:
        CheckpointError: unexpected official keys, keys the model needs but the checkpoint lacks, or shape
            mismatches (e.g. a large checkpoint into the tiny preset); the message names the keys.
    """
    expected = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_key, tensor in state_dict.items():
        key = _strip_prefix(raw_key)
        ours = _map_key(key)
        if ours is None:
            reason = _drop_reason(key)
            if reason is None:
                unexpected.append(raw_key)
            else:
                log.debug("dropping %s: %s", raw_key, reason)
            continue
        converted[ours] = tensor
    missing = sorted(set(expected) - set(converted))
    unknown_targets = sorted(set(converted) - set(expected))
    shape_errors = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    if unknown_targets:
        problems.append(f"{len(unknown_targets)} keys with no counterpart in this model, e.g. {unknown_targets[:5]}")
    if missing:
        problems.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:5]}")
    if shape_errors:
        problems.append(f"{len(shape_errors)} shape mismatches, e.g. {shape_errors[:3]}")
    if problems:
        backbone = getattr(getattr(model, "config", None), "backbone", "?")
        raise CheckpointError(
            f"{source} does not fit this model (backbone {backbone}); the checkpoint looks like "
            f"{_guess_variant({_strip_prefix(k): v for k, v in state_dict.items()})}: " + "; ".join(problems)
        )
    return {k: v.to(expected[k].dtype) for k, v in converted.items()}


def load_official(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, torch.Tensor], param_key: str = "auto"
) -> nn.Module:
    """Load an official DDColor checkpoint into `model` (in place) and return it.

    Args:
        model: a `DDColor` of the matching preset ("tiny" for ddcolor_paper_tiny, "large" for the others).
        path_or_state_dict: a checkpoint file (`.pth`, `.pt`, `.bin`, `.safetensors`) or a state dict,
            raw or wrapped as `{"params": sd}` / `{"params_ema": sd}`.
        param_key: wrapper entry to use (see `read_checkpoint`).

    Raises:
        CheckpointError: unreadable file, not a state dict, or keys/shapes that do not fit.
    """
    if isinstance(path_or_state_dict, str | Path):
        source = str(path_or_state_dict)
        state_dict = read_checkpoint(path_or_state_dict, param_key=param_key)
    else:
        source = "<state dict>"
        state_dict = unwrap_state_dict(path_or_state_dict, source=source, param_key=param_key)
    model.load_state_dict(convert_official_state_dict(state_dict, model, source=source), strict=True)
    return model
