"""The one generator loader: whatever names a model -> a `DDColor` in eval mode.

`load_generator(spec)` takes

* an official release name (``ddcolor_paper_tiny``, also as ``official:ddcolor_paper_tiny``), from the weights cache;
* a file: one of our ``.safetensors`` checkpoints, or an official ``.pth``/``.pt``/``.bin``
  (`ddcolor.model.checkpoint.load_model`);
* an MLflow model URI (``models:/ddcolor@champion``, ``models:/ddcolor/3``, ``models:/m-...``), from the registry
  at ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``; `ddcolor.registry` is imported only then);
* ``random-init:PRESET[:SEED]``: random weights, for smoke tests (logs `RANDOM_INIT_WARNING`: colors are
  meaningless).

Colorization, evaluation, the playground, the serving model and training's ``init`` all load through it.
"""

from __future__ import annotations

import logging
import os

import torch

from ddcolor.model import build_model
from ddcolor.model.ddcolor import DDColor

__all__ = [
    "MODEL_URI_PREFIXES",
    "RANDOM_INIT_PREFIX",
    "RANDOM_INIT_WARNING",
    "load_generator",
    "parse_random_init",
    "random_init_generator",
]

log = logging.getLogger(__name__)

MODEL_URI_PREFIXES = ("models:/", "runs:/")
RANDOM_INIT_PREFIX = "random-init:"
RANDOM_INIT_WARNING = (
    "RANDOM-INIT MODEL: the {preset} network has random weights, so the output colors are MEANINGLESS "
    "(smoke tests only). For real colors fetch weights (`ddcolor weights fetch ddcolor_paper_tiny`, then "
    "--model ddcolor_paper_tiny) or train a model and pass its checkpoint with --model."
)


def parse_random_init(spec: str) -> tuple[str, int]:
    """``random-init:PRESET[:SEED]`` -> ``(preset, seed)`` (preset default ``atto``, seed default 0).

    Raises:
        ValueError: not that form, an unknown preset, or a seed that is not an integer.
    """
    from ddcolor.presets import PRESETS

    parts = spec.removeprefix(RANDOM_INIT_PREFIX).split(":")
    preset, seed = parts[0] or "atto", parts[1] if len(parts) > 1 else "0"
    if (
        not spec.startswith(RANDOM_INIT_PREFIX)
        or preset not in PRESETS
        or len(parts) > 2
        or not seed.lstrip("-").isdigit()
    ):
        raise ValueError(
            f"bad random-init spec {spec!r}: expected random-init:PRESET:SEED with PRESET one of "
            f"{', '.join(PRESETS)} and an integer SEED (e.g. random-init:atto:0)"
        )
    return preset, int(seed)


def random_init_generator(preset: str = "atto", seed: int = 0, warn: bool = True) -> DDColor:
    """An explicitly random-initialised generator in eval mode, for smoke tests; its colors mean nothing.

    Args:
        preset: model preset ("atto" is the fastest).
        seed: seed of the initialisation (the global RNG state is left untouched).
        warn: log `RANDOM_INIT_WARNING` (callers that show it themselves pass False).
    """
    if warn:
        log.warning(RANDOM_INIT_WARNING.format(preset=preset))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(preset, pretrained=None).eval()


def load_generator(
    spec: str | os.PathLike[str],
    *,
    preset: str | None = None,
    device: str | torch.device | None = None,
    tracking_uri: str | None = None,
) -> DDColor:
    """The generator `spec` names (see the module docstring), in eval mode.

    Args:
        spec: release name, checkpoint file, ``models:/`` URI or ``random-init:PRESET[:SEED]``.
        preset: model preset of an official ``.pth`` file; inferred from the checkpoint when None.
        device: move it there (`ddcolor.devices.resolve_device` names); None leaves it on the CPU.
        tracking_uri: MLflow for ``models:/`` URIs (None: ``MLFLOW_TRACKING_URI``).

    Raises:
        ddcolor.weights.WeightsNotFoundError: a release that is not in the cache (the message names the
            `ddcolor weights fetch` command).
        FileNotFoundError: no such release or file (the message lists what ``spec`` may be), or a ``models:/`` URI
            that does not resolve.
        ddcolor.model.CheckpointError: an unreadable or non-fitting checkpoint.
        ValueError: a malformed ``random-init:`` spec, or an unusable `device`.
    """
    text = str(spec)
    if text.startswith(RANDOM_INIT_PREFIX):
        model = random_init_generator(*parse_random_init(text))
    elif text.startswith(MODEL_URI_PREFIXES):
        from ddcolor.registry import load_registered_generator  # MLflow only when a registry model is asked for

        model = load_registered_generator(text, tracking_uri=tracking_uri)
    else:
        from ddcolor.model.checkpoint import load_model

        model = load_model(spec, preset=preset)
    if device is not None:
        from ddcolor.devices import resolve_device

        model = model.to(resolve_device(device))
    return model.eval()
