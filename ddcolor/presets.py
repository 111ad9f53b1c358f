"""Named model sizes and official releases: plain data, importable without torch (config validation uses it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INPUT_MULTIPLE", "OFFICIAL_RELEASES", "PRESETS", "Preset"]

INPUT_MULTIPLE = 32  # total stride of the ConvNeXt encoder: network input sizes must be multiples of it


@dataclass(frozen=True)
class Preset:
    """A named model size: timm backbone and the weights-cache entry of its ImageNet weights."""

    backbone: str
    imagenet_weights: str
    description: str


PRESETS: dict[str, Preset] = {
    "atto": Preset("convnext_atto", "convnext_atto.d2_in1k", "3.4 M-param ConvNeXt encoder; CPU tests and demo"),
    "tiny": Preset("convnext_tiny", "convnext_tiny.fb_in22k", "as the official ddcolor_paper_tiny release"),
    "large": Preset("convnext_large", "convnext_large.fb_in22k", "as the official paper/modelscope/artistic releases"),
}

# Official release -> the preset it was trained with (all: 100 queries, 9 decoder layers, nf 512).
OFFICIAL_RELEASES: dict[str, str] = {
    "ddcolor_paper_tiny": "tiny",
    "ddcolor_paper": "large",
    "ddcolor_modelscope": "large",
    "ddcolor_artistic": "large",
}
