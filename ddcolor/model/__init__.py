"""The DDColor network: builders, official-checkpoint loading and inference preparation.

Public API (other modules and users rely on it):
    build_model(preset, pretrained="imagenet") -> DDColor
    load_official(model, path_or_state_dict) -> DDColor
    prepare_for_inference(model, precision="fp32") -> nn.Module
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import timm

from ddcolor.model.convert import CheckpointError, convert_official_state_dict, load_official, read_checkpoint
from ddcolor.model.ddcolor import IMAGENET_MEAN, IMAGENET_STD, INPUT_MULTIPLE, DDColor, DDColorConfig
from ddcolor.model.encoder import Encoder
from ddcolor.model.inference import prepare_for_inference

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_MULTIPLE",
    "OFFICIAL_RELEASES",
    "PRESETS",
    "CheckpointError",
    "DDColor",
    "DDColorConfig",
    "Preset",
    "build_model",
    "convert_official_state_dict",
    "load_official",
    "prepare_for_inference",
    "read_checkpoint",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A named model size: timm backbone and the weights-cache entry of its ImageNet weights."""

    backbone: str
    imagenet_weights: str
    description: str


PRESETS: dict[str, Preset] = {
    "atto": Preset("convnext_atto", "convnext_atto.d2_in1k", "3.7 M-param ConvNeXt encoder; fast CPU tests and demo"),
    "tiny": Preset("convnext_tiny", "convnext_tiny.fb_in22k", "as the official ddcolor_paper_tiny release"),
    "large": Preset("convnext_large", "convnext_large.fb_in22k", "as the official paper/modelscope/artistic releases"),
}

# Official release -> preset it was trained with.
OFFICIAL_RELEASES: dict[str, str] = {
    "ddcolor_paper_tiny": "tiny",
    "ddcolor_paper": "large",
    "ddcolor_modelscope": "large",
    "ddcolor_artistic": "large",
}


def build_model(preset: str = "tiny", pretrained: str | None = "imagenet", **overrides) -> DDColor:
    """Build a DDColor generator.

    Args:
        preset: "atto", "tiny", "large", or any timm backbone name with four feature stages.
        pretrained: where the weights come from:
            - "imagenet": ImageNet weights for the encoder from the weights cache (the official training
              start point), random decoder;
            - an official release name ("ddcolor_paper_tiny", "ddcolor_paper", "ddcolor_modelscope",
              "ddcolor_artistic"), or "official:<name>": the whole network from the weights cache;
            - None: explicit random initialisation of everything (tests, from-scratch experiments).
        **overrides: `DDColorConfig` fields (e.g. num_queries=50).

    Returns:
        The model in train mode.

    Raises:
        ValueError: unknown preset/backbone or release, or a release that does not fit the preset.
        ddcolor.weights.WeightsNotFoundError: the requested weights are not in the cache (the message says
            which `ddcolor weights` command fetches them).
    """
    from ddcolor import weights  # local import: keeps `ddcolor.model` importable without the cache module

    if preset in PRESETS:
        backbone = PRESETS[preset].backbone
    elif timm.is_model(preset):
        backbone = preset
    else:
        raise ValueError(f"unknown preset or timm backbone {preset!r}; presets: {sorted(PRESETS)}")
    config = replace(DDColorConfig(backbone=backbone), **overrides)

    release = pretrained.removeprefix("official:") if isinstance(pretrained, str) else None
    if pretrained is None or release in OFFICIAL_RELEASES:
        if release is not None and OFFICIAL_RELEASES[release] != preset:
            raise ValueError(
                f"official release {release!r} is a {OFFICIAL_RELEASES[release]!r} model; "
                f"build it with preset={OFFICIAL_RELEASES[release]!r}, not {preset!r}"
            )
        model = DDColor(config, Encoder(backbone, pretrained_file=None))
        if release is not None:
            load_official(model, weights.resolve(release))
            log.info("loaded official release %s", release)
        return model
    if pretrained != "imagenet":
        raise ValueError(
            f"pretrained must be 'imagenet', None, or an official release {sorted(OFFICIAL_RELEASES)}; "
            f"got {pretrained!r}"
        )
    if preset not in PRESETS:
        raise ValueError(
            f"no ImageNet weights are registered for backbone {backbone!r}; use a preset {sorted(PRESETS)} "
            "or pretrained=None for random initialisation"
        )
    weights_file = weights.resolve(PRESETS[preset].imagenet_weights)
    return DDColor(config, Encoder(backbone, pretrained_file=weights_file))
