"""Pixel decoder: a wide U-Net upsampler from 1/32 back to full resolution (DeOldify's "DynamicUnet wide").

Three `UnetBlockWide` stages go 1/32 -> 1/16 -> 1/8 -> 1/4, fusing encoder skips; a final x4 PixelShuffle
reaches full resolution. The 1/16, 1/8 and 1/4 outputs feed the color decoder; the full-resolution output
is the per-pixel embedding the color queries are projected onto.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddcolor.model.layers import PixelShuffleICNR, spectral_conv

__all__ = ["PixelDecoder", "UnetBlockWide"]


def _skip_batchnorm(num_chs: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(num_chs)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.fill_(1e-3)  # upstream `batchnorm_2d` init
    return bn


class UnetBlockWide(nn.Module):
    """Upsample x2 and fuse with an encoder skip: shuffle(up) || BN(skip) -> ReLU -> conv3x3 -> ReLU -> BN.

    Args:
        up_in_chs: channels of the tensor being upsampled.
        skip_chs: channels of the encoder skip feature.
        out_chs: output channels.
        blur: anti-checkerboard blur after the pixel shuffle.
    """

    def __init__(self, up_in_chs: int, skip_chs: int, out_chs: int, blur: bool = True) -> None:
        super().__init__()
        self.shuf = PixelShuffleICNR(up_in_chs, out_chs, scale=2, blur=blur, use_bn=True)
        self.bn = _skip_batchnorm(skip_chs)
        self.relu = nn.ReLU()
        self.conv = spectral_conv(out_chs + skip_chs, out_chs, kernel_size=3, use_relu=True, use_bn=True)

    def forward(self, up_in: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, up_in_chs, h, w), (B, skip_chs, 2h, 2w) -> (B, out_chs, 2h, 2w)."""
        up = self.shuf(up_in)
        if up.shape[-2:] != skip.shape[-2:]:  # only for odd feature sizes; kept for parity with upstream
            up = F.interpolate(up, skip.shape[-2:], mode="nearest")
        return self.conv(self.relu(torch.cat([up, self.bn(skip)], dim=1)))


class PixelDecoder(nn.Module):
    """U-Net decoder over four encoder features.

    Args:
        encoder_channels: channels of the encoder stages, shallow to deep (strides 4, 8, 16, 32).
        nf: width of the decoder blocks; the last block and the full-resolution embedding use nf // 2.
        blur: anti-checkerboard blur in every pixel shuffle.

    Attributes:
        scale_channels: channels of the multi-scale outputs at strides 16, 8, 4 (e.g. [512, 512, 256]).
        embed_dim: channels of the full-resolution embedding (nf // 2).
    """

    def __init__(self, encoder_channels: list[int], nf: int = 512, blur: bool = True) -> None:
        super().__init__()
        skips = encoder_channels[-2::-1]  # strides 16, 8, 4
        outs = [nf] * (len(skips) - 1) + [nf // 2]
        ins = [encoder_channels[-1], *outs[:-1]]
        self.layers = nn.ModuleList(
            [UnetBlockWide(i, s, o, blur=blur) for i, s, o in zip(ins, skips, outs, strict=True)]
        )
        self.embed_dim = nf // 2
        self.last_shuf = PixelShuffleICNR(self.embed_dim, self.embed_dim, scale=4, blur=blur, use_bn=False)
        self.scale_channels = outs

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Decode encoder features.

        Args:
            features: four maps at strides 4, 8, 16, 32 (from `Encoder`).

        Returns:
            (multi_scale, pixel_embedding): three maps at strides 16, 8, 4 with `scale_channels` channels,
            and (B, embed_dim, H, W) at the input resolution.
        """
        x = features[-1]
        multi_scale = []
        for layer, skip in zip(self.layers, features[-2::-1], strict=True):
            x = layer(x, skip)
            multi_scale.append(x)
        return multi_scale, self.last_shuf(x)
