"""DDColor: Towards Photo-Realistic Image Colorization via Dual Decoders (Kang et al., ICCV 2023).

Paper: https://arxiv.org/abs/2212.11613. Upstream code and weights (Apache-2.0): https://github.com/piddnad/DDColor

gray RGB (B,3,H,W) -> ImageNet normalisation -> encoder (4 scales) -> pixel decoder (1/16, 1/8, 1/4 + full
resolution embedding) and color decoder (100 queries) -> query maps (B,100,H,W) || normalised input ->
1x1 spectral conv -> ab (B,2,H,W) in CIELAB units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ddcolor.model.color_decoder import MultiScaleColorDecoder
from ddcolor.model.encoder import Encoder
from ddcolor.model.layers import SpectralNormConv2d
from ddcolor.model.pixel_decoder import PixelDecoder
from ddcolor.presets import INPUT_MULTIPLE

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DDColor", "DDColorConfig", "check_gray_rgb_shape"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DDColorConfig:
    """Architecture hyper-parameters; the defaults are those of every official release."""

    backbone: str = "convnext_tiny"
    num_queries: int = 100
    num_scales: int = 3
    dec_layers: int = 9
    nf: int = 512
    hidden_dim: int = 256
    nheads: int = 8
    dim_feedforward: int = 2048
    num_output_channels: int = 2
    blur: bool = True


def check_gray_rgb_shape(shape: Sequence[int], check_size: bool = True) -> None:
    """Raise ValueError unless ``shape`` is (B, 3, H, W) with H and W multiples of 32 (the network's input contract).

    Args:
        shape: the input's shape.
        check_size: also check H and W (off while tracing for export, where sizes are symbolic).
    """
    if len(shape) != 4 or shape[1] != 3:
        raise ValueError(f"expected gray RGB of shape (B, 3, H, W), got {tuple(shape)}")
    h, w = shape[-2:]
    if check_size and (h % INPUT_MULTIPLE or w % INPUT_MULTIPLE):
        raise ValueError(
            f"input size {h}x{w} is not a multiple of {INPUT_MULTIPLE}; resize the image first "
            f"(the Colorizer does this and maps ab back to the original size)"
        )


class DDColor(nn.Module):
    """The DDColor generator.

    Args:
        config: architecture hyper-parameters.
        encoder: a ready `Encoder` (built by `build_model`, which resolves pretrained backbone weights).
    """

    def __init__(self, config: DDColorConfig, encoder: Encoder) -> None:
        super().__init__()
        if config.num_scales != 3:
            raise ValueError(
                f"num_scales must be 3 (the pixel decoder yields strides 16, 8, 4), got {config.num_scales}"
            )
        self.config = config
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.encoder = encoder
        self.pixel_decoder = PixelDecoder(encoder.channels, nf=config.nf, blur=config.blur)
        self.color_decoder = MultiScaleColorDecoder(
            self.pixel_decoder.scale_channels,
            self.pixel_decoder.embed_dim,
            hidden_dim=config.hidden_dim,
            num_queries=config.num_queries,
            nheads=config.nheads,
            dim_feedforward=config.dim_feedforward,
            dec_layers=config.dec_layers,
        )
        # fusion: query maps || normalised gray RGB -> ab
        self.refine = SpectralNormConv2d(config.num_queries + 3, config.num_output_channels, kernel_size=1)

    def forward(self, gray_rgb: torch.Tensor) -> torch.Tensor:
        """Predict chrominance.

        Args:
            gray_rgb: (B, 3, H, W) float sRGB in [0, 1], the gray image built from L with a = b = 0
                (`ddcolor.color.gray_rgb_from_l`). H and W must be multiples of 32; resize (or pad) first.

        Returns:
            (B, 2, H, W) predicted a*, b* in CIELAB units, unbounded (clamp to [-128, 127] before use).

        Raises:
            ValueError: wrong rank, channel count, or a size that is not a multiple of 32.
        """
        check_gray_rgb_shape(gray_rgb.shape)
        x = (gray_rgb - self.mean) / self.std
        features = self.encoder(x)  # strides 4, 8, 16, 32
        multi_scale, pixel_embedding = self.pixel_decoder(features)
        query_maps = self.color_decoder(multi_scale, pixel_embedding)  # (B, Q, H, W)
        return self.refine(torch.cat([query_maps, x], dim=1))
