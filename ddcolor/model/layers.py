"""Small building blocks shared by the DDColor pixel decoder and fusion head.

The layer layout (module and parameter names) follows the upstream DDColor / DeOldify code so that the
official checkpoints load key for key (see `ddcolor.model.convert`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AntiCheckerboardBlur", "PixelShuffleICNR", "SpectralNormConv2d", "blur_2x2", "icnr_", "spectral_conv"]


class SpectralNormConv2d(nn.Module):
    """Conv2d whose weight is divided by its largest singular value (Miyato et al., 2018).

    Explicit re-implementation of `torch.nn.utils.spectral_norm(nn.Conv2d(...))` with the same state-dict
    entries (`weight_orig`, `weight_u`, `weight_v`, `bias`), so official checkpoints load unchanged, but
    without forward pre-hooks: the normalised weight is computed in `forward`.

    Training mode runs one power iteration per forward (updating `weight_u`/`weight_v` in place, no
    gradient), as torch does. Eval mode uses the stored vectors: sigma = u . (W v).

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding; default keeps the spatial size for odd kernels.
        bias: add a learnable bias.
        eps: numerical floor for vector normalisation.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = True,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = (kernel_size - 1) // 2 if padding is None else padding
        self.eps = eps
        weight = torch.empty(out_chs, in_chs, kernel_size, kernel_size)
        nn.init.kaiming_normal_(weight)
        self.weight_orig = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_chs)) if bias else None
        self.register_buffer("weight_u", F.normalize(torch.randn(out_chs), dim=0, eps=eps))
        self.register_buffer("weight_v", F.normalize(torch.randn(weight[0].numel()), dim=0, eps=eps))
        self.power_iteration(n_iterations=15)  # start from a good estimate, like torch's parametrization

    @torch.no_grad()
    def power_iteration(self, n_iterations: int = 1) -> None:
        weight_mat = self.weight_orig.flatten(1)  # (out, in*k*k)
        for _ in range(n_iterations):
            self.weight_v.copy_(F.normalize(weight_mat.t() @ self.weight_u, dim=0, eps=self.eps))
            self.weight_u.copy_(F.normalize(weight_mat @ self.weight_v, dim=0, eps=self.eps))

    def normalized_weight(self) -> torch.Tensor:
        """The weight divided by its spectral norm estimate sigma = u . (W v); same shape as `weight_orig`."""
        u, v = self.weight_u, self.weight_v
        if self.training:
            self.power_iteration()
            # Clones keep autograd from seeing the in-place updates of the next iteration (as torch does).
            u, v = u.clone(), v.clone()
        sigma = torch.dot(u, (self.weight_orig.flatten(1) @ v).to(u.dtype))  # fp32 even under autocast
        return self.weight_orig / sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        out_chs, in_chs, k, _ = self.weight_orig.shape
        return f"{in_chs}, {out_chs}, kernel_size={k}, stride={self.stride}, bias={self.bias is not None}"


def icnr_(weight: torch.Tensor, scale: int = 2) -> None:
    """ICNR initialisation (Aitken et al., 2017) for a conv followed by PixelShuffle(scale), in place.

    Every group of scale**2 output channels starts identical, so the shuffled output has no checkerboard.
    """
    out_chs, in_chs, kh, kw = weight.shape
    sub = torch.empty(out_chs // scale**2, in_chs, kh, kw)
    nn.init.kaiming_normal_(sub)
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale**2, dim=0))


def spectral_conv(
    in_chs: int, out_chs: int, kernel_size: int = 3, *, use_relu: bool = False, use_bn: bool = False
) -> nn.Sequential:
    """Spectral-norm conv, optionally followed by ReLU and BatchNorm (upstream `custom_conv_layer`).

    The conv has a bias only when no BatchNorm follows. Index layout [conv, (relu), (bn)] matches upstream
    keys such as `conv.0.weight_orig` and `conv.2.running_mean`.
    """
    layers: list[nn.Module] = [SpectralNormConv2d(in_chs, out_chs, kernel_size, bias=not use_bn)]
    if use_relu:
        layers.append(nn.ReLU(inplace=True))
    if use_bn:
        layers.append(nn.BatchNorm2d(out_chs))
    return nn.Sequential(*layers)


def blur_2x2(x: torch.Tensor) -> torch.Tensor:
    """Upstream anti-checkerboard blur: replication pad left and top by 1, then 2x2 mean, stride 1; (B,C,H,W) kept.

    Same values as ``AvgPool2d(2, stride=1)(ReplicationPad2d((1, 0, 1, 0))(x))`` (bit-identical forward), but the
    pad is written as two concatenations of the first row / column: inductor's fake kernel for
    ``aten.replication_pad2d_backward`` assumes contiguous strides, so ``torch.compile`` of a training step on
    channels-last tensors failed with a stride assertion (torch 2.14). The backward of a concatenation is a slice
    sum, equal to the replication pad's up to float summation order.
    """
    x = torch.cat([x[:, :, :1], x], dim=2)
    x = torch.cat([x[:, :, :, :1], x], dim=3)
    return F.avg_pool2d(x, 2, stride=1)


class AntiCheckerboardBlur(nn.Module):
    """`blur_2x2` as a module (no parameters, so checkpoints are unaffected)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur_2x2(x)


class PixelShuffleICNR(nn.Module):
    """Upsample x`scale`: 1x1 spectral conv (+BN) -> ReLU -> PixelShuffle -> optional blur.

    The blur (replication pad right/bottom + 2x2 average pool, stride 1) removes checkerboard artefacts
    (Sugawara et al., 2019). Upstream name: `CustomPixelShuffle_ICNR`.

    Args:
        in_chs: input channels.
        out_chs: output channels after the shuffle.
        scale: upsampling factor.
        blur: apply the anti-checkerboard blur.
        use_bn: BatchNorm after the conv (then the conv has no bias).
    """

    def __init__(self, in_chs: int, out_chs: int, scale: int = 2, blur: bool = True, use_bn: bool = True) -> None:
        super().__init__()
        self.conv = spectral_conv(in_chs, out_chs * scale**2, kernel_size=1, use_bn=use_bn)
        icnr_(self.conv[0].weight_orig, scale)
        self.conv[0].power_iteration(n_iterations=15)  # re-estimate sigma for the new weight
        self.relu = nn.ReLU(inplace=True)
        self.shuffle = nn.PixelShuffle(scale)
        self.blur = AntiCheckerboardBlur() if blur else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, in, H, W) -> (B, out*s*s, H, W) -> (B, out, s*H, s*W)
        return self.blur(self.shuffle(self.relu(self.conv(x))))
