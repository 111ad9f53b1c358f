"""The DDColor network: builders, official-checkpoint loading and inference preparation.

Public API (other modules and users rely on it):
    build_model(preset, pretrained="imagenet") -> DDColor
    load_official(model, path_or_state_dict) -> DDColor
    prepare_for_inference(model, precision="fp32") -> nn.Module
"""

from __future__ import annotations

import logging
from dataclasses import replace

import timm

from ddcolor.model.convert import CheckpointError, convert_official_state_dict, load_official, read_checkpoint
from ddcolor.model.ddcolor import IMAGENET_MEAN, IMAGENET_STD, DDColor, DDColorConfig
from ddcolor.model.encoder import Encoder
from ddcolor.model.inference import prepare_for_inference
from ddcolor.presets import INPUT_MULTIPLE, OFFICIAL_RELEASES, PRESETS, Preset

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
    "build_model_from_config",
    "convert_official_state_dict",
    "load_official",
    "prepare_for_inference",
    "read_checkpoint",
]

log = logging.getLogger(__name__)


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
        checkpoint = weights.resolve(release) if release is not None else None  # fail fast, before building
        model = DDColor(config, Encoder(backbone, pretrained_file=None))
        if checkpoint is not None:
            load_official(model, checkpoint)
            log.info("loaded official release %s from %s", release, checkpoint)
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


def build_model_from_config(model_config) -> DDColor:
    """Build the generator described by the `model` section of `params.yaml` (`ddcolor.config.ModelConfig`)."""
    return build_model(
        model_config.backbone or model_config.preset,
        pretrained=model_config.pretrained,
        num_queries=model_config.num_queries,
        num_scales=model_config.num_scales,
        dec_layers=model_config.dec_layers,
        nf=model_config.nf,
        hidden_dim=model_config.hidden_dim,
        nheads=model_config.nheads,
        dim_feedforward=model_config.dim_feedforward,
    )
