"""Image encoder: a timm backbone returning four feature maps, each followed by its own LayerNorm.

Upstream DDColor taps a ConvNeXt with forward hooks on four extra channels-first LayerNorms (`norm0..3`)
whose outputs feed the decoders, while the un-normalised tensor flows on to the next stage. Here timm's
`features_only` wrapper returns the stage outputs explicitly and the norms are applied after it, which
computes the same function without hooks.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["Encoder"]


class Encoder(nn.Module):
    """timm backbone with `features_only=True` plus one channels-first LayerNorm per output stage.

    Args:
        backbone: timm model name, e.g. "convnext_tiny". Must provide four feature stages.
        pretrained_file: local weight file (from `ddcolor.weights`) to initialise the backbone with; None
            means random initialisation.
        norm_eps: LayerNorm epsilon (1e-6 as in ConvNeXt and upstream DDColor).

    Attributes:
        channels: output channels per stage, shallow to deep (e.g. [96, 192, 384, 768] for convnext_tiny).
        reductions: stride of each stage w.r.t. the input (e.g. [4, 8, 16, 32]).
    """

    def __init__(self, backbone: str, pretrained_file: Path | None = None, norm_eps: float = 1e-6) -> None:
        super().__init__()
        kwargs = {}
        if pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
        self.backbone = timm.create_model(
            backbone, pretrained=pretrained_file is not None, features_only=True, out_indices=(0, 1, 2, 3), **kwargs
        )
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())
        if len(self.channels) != 4:
            raise ValueError(f"backbone {backbone!r} gives {len(self.channels)} feature stages; DDColor needs 4")
        self.norms = nn.ModuleList([LayerNorm2d(c, eps=norm_eps) for c in self.channels])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encode an ImageNet-normalised image.

        Args:
            x: (B, 3, H, W) float, ImageNet-normalised; H and W multiples of 32.

        Returns:
            Four normalised feature maps, shallow to deep: (B, channels[i], H / reductions[i], W / reductions[i]).
        """
        return [norm(feature) for norm, feature in zip(self.norms, self.backbone(x), strict=True)]
