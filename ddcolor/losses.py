"""DDColor training losses: pixel L1, VGG16-BN perceptual, vanilla GAN with a U-Net-style patch critic, colorfulness.

Follows the official DDColor recipe (``options/train/train_ddcolor.yml``, BasicSR ``PerceptualLoss``,
``GANLoss(gan_type="vanilla")``, ``ColorfulnessLoss`` and ``DynamicUNetDiscriminator``)::

    pred_rgb = lab_to_rgb(cat(L, pred_ab))                        # clamped to [0, 1]
    gt_rgb   = color_enhance(lab_to_rgb(cat(L, ab)), 1.2)         # saturation-boosted ground truth
    G loss   = 0.1 * L1(pred_ab, ab)                              # original ab, not the enhanced one
             + 5.0 * VGG16-BN perceptual(pred_rgb, gt_rgb)
             + 1.0 * BCE(D(pred_rgb), real)
             + 0.5 * colorfulness_loss(pred_rgb)                  # 1 - CF, mean over the batch (see below)
    D loss   = BCE(D(gt_rgb), real) + BCE(D(pred_rgb.detach()), fake)

Deviation from the official code: the official ``ColorfulnessLoss`` *sums* ``1 - CF`` over the batch, so its
effective weight grows with the per-GPU batch (4 officially). Here it is averaged (``reduction="mean"``) so the
weight does not depend on the batch size; multiply the weight by the per-GPU batch size to reproduce the official
scale.

A loss weight of 0 skips that term entirely (no VGG forward for ``perceptual=0``, no discriminator forward for
``gan=0``); skipped terms are absent from the returned term dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vgg import cfgs as _vgg_cfgs
from torchvision.models.vgg import make_layers as _vgg_make_layers
from torchvision.transforms.functional import rgb_to_grayscale

from ddcolor.color import colorfulness_loss, lab_to_rgb
from ddcolor.model.layers import SpectralNormConv2d

__all__ = [
    "DEFAULT_LAYER_WEIGHTS",
    "DDColorLoss",
    "Discriminator",
    "LossWeights",
    "PerceptualLoss",
    "SelfAttention",
    "color_enhance",
    "gan_loss",
    "vgg16_bn_layer_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYER_WEIGHTS: Mapping[str, float] = {
    "conv1_1": 1 / 16,
    "conv2_1": 1 / 8,
    "conv3_1": 1 / 4,
    "conv4_1": 1 / 2,
    "conv5_1": 1.0,
}


# --- color enhancement ------------------------------------------------------------------------------------
def color_enhance(rgb: torch.Tensor, factor: float = 1.2) -> torch.Tensor:
    """Boost saturation: ``clip(gray + factor * (rgb - gray), 0, 1)``, as official ``basicsr/utils/color_enhance.py``.

    ``gray`` is torchvision's ``Grayscale(3)`` (``rgb_to_grayscale``, luma weights 0.2989 / 0.587 / 0.114, the
    rounded ITU-R 601-2 weights torchvision uses). ``factor=1`` returns ``rgb`` (clipped to [0, 1]).

    Args:
        rgb: float tensor (B, 3, H, W), sRGB in [0, 1].
        factor: saturation multiplier; > 1 boosts, < 1 desaturates.

    Returns:
        Tensor like ``rgb``, in [0, 1].
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must have shape (B, 3, H, W), got {tuple(rgb.shape)}")
    gray = rgb_to_grayscale(rgb, num_output_channels=3)
    return (gray * (1.0 - factor) + rgb * factor).clamp(0.0, 1.0)


# --- perceptual loss --------------------------------------------------------------------------------------
def vgg16_bn_layer_names() -> list[str]:
    """Names of the modules of torchvision's ``vgg16_bn().features``, in order (BasicSR naming).

    ``conv{block}_{i}``, ``bn{block}_{i}``, ``relu{block}_{i}`` and ``pool{block}``, e.g. index 0 is ``conv1_1``,
    7 is ``conv2_1``, 14 ``conv3_1``, 24 ``conv4_1`` and 34 ``conv5_1``.
    """
    names: list[str] = []
    block, conv = 1, 0
    for item in _vgg_cfgs["D"]:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"bn{block}_{conv}", f"relu{block}_{conv}"]
    return names


def _vgg16_bn_features(n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` modules of ``torchvision.models.vgg16_bn(weights=None).features``, same init.

    Built with torchvision's own ``make_layers`` so the full classifier (120 M parameters) is never allocated.
    """
    features = _vgg_make_layers(_vgg_cfgs["D"], batch_norm=True)
    for m in features:  # torchvision VGG.__init__ init, so pretrained=None equals vgg16_bn(weights=None)
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return features[:n_layers]


class PerceptualLoss(nn.Module):
    """VGG16-BN perceptual loss of DDColor: weighted L1 between conv features of prediction and target.

    Features are the raw conv outputs (before BN and ReLU) of ``conv1_1 .. conv5_1`` (indices 0, 7, 14, 24, 34
    of ``vgg16_bn.features``); the network is truncated after the last requested layer. Inputs are RGB in [0, 1],
    normalised with the ImageNet mean/std. The VGG is frozen and always in eval mode (BN uses running stats).

    Args:
        pretrained: ``"imagenet"`` loads torchvision's ``vgg16_bn-6c64b313.pth`` from the weights cache
            (``ddcolor.weights.load_state_dict("vgg16_bn")``; raises ``WeightsNotFoundError`` if missing);
            ``None`` keeps torchvision's random initialisation (tests only: the loss is then meaningless).
        layer_weights: ``{layer_name: weight}``; names as :func:`vgg16_bn_layer_names`, any layer allowed.

    Attributes:
        layer_indices: ``{layer_name: index into self.vgg}``.
    """

    def __init__(
        self, pretrained: str | None = "imagenet", layer_weights: Mapping[str, float] = DEFAULT_LAYER_WEIGHTS
    ) -> None:
        super().__init__()
        if not layer_weights:
            raise ValueError("layer_weights must name at least one layer")
        names = vgg16_bn_layer_names()
        unknown = [n for n in layer_weights if n not in names]
        if unknown:
            raise ValueError(f"Unknown VGG16-BN layers {unknown}; known: {', '.join(names)}")
        self.layer_weights = {name: float(w) for name, w in layer_weights.items()}
        self.layer_indices = {name: names.index(name) for name in self.layer_weights}
        n_layers = max(self.layer_indices.values()) + 1
        self.vgg = _vgg16_bn_features(n_layers)
        if pretrained == "imagenet":
            from ddcolor import weights

            state = weights.load_state_dict("vgg16_bn")
            prefix = "features."
            features_state = {
                k[len(prefix) :]: v
                for k, v in state.items()
                if k.startswith(prefix) and int(k[len(prefix) :].split(".")[0]) < n_layers
            }
            self.vgg.load_state_dict(features_state, strict=True)
        elif pretrained is not None:
            raise ValueError(f"pretrained must be 'imagenet' or None, got {pretrained!r}")
        self.pretrained = pretrained
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.vgg.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always eval: the frozen VGG's BatchNorm must use its running statistics. ``mode`` is ignored."""
        return super().train(False)

    def features(self, rgb: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{layer_name: conv output}`` for RGB in [0, 1] of shape (B, 3, H, W)."""
        x = (rgb - self.mean) / self.std
        wanted = {i: name for name, i in self.layer_indices.items()}
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
        return out

    def forward(self, pred_rgb: torch.Tensor, target_rgb: torch.Tensor) -> torch.Tensor:
        """Sum over layers of ``weight * L1(feat(pred), feat(target))`` (mean over elements); a scalar."""
        pred_feats = self.features(pred_rgb)
        with torch.no_grad():
            target_feats = self.features(target_rgb.detach())
        loss = pred_rgb.new_zeros(())
        for name, w in self.layer_weights.items():
            loss = loss + w * F.l1_loss(pred_feats[name], target_feats[name])
        return loss


# --- discriminator ----------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """SAGAN self-attention (fastai ``SelfAttention``): ``x + gamma * value @ softmax(query^T key)``.

    query/key are 1x1 spectral convs to ``channels // 8``, value a 1x1 spectral conv to ``channels``, all without
    bias (fastai's spectral ``conv1d``; here 1x1 ``SpectralNormConv2d``, same parameter count). ``gamma`` starts
    at 0, so the block is the identity at initialisation.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = SpectralNormConv2d(channels, max(channels // 8, 1), 1, bias=False)
        self.key = SpectralNormConv2d(channels, max(channels // 8, 1), 1, bias=False)
        self.value = SpectralNormConv2d(channels, channels, 1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = self.query(x).flatten(2)  # (B, C/8, N)
        g = self.key(x).flatten(2)  # (B, C/8, N)
        v = self.value(x).flatten(2)  # (B, C, N)
        beta = torch.softmax(torch.bmm(f.transpose(1, 2), g), dim=1)  # (B, N, N), normalised over dim 1 as fastai
        out = self.gamma * torch.bmm(v, beta) + x.flatten(2)
        return out.view(b, c, h, w)


def _sn_conv_relu(in_chs: int, out_chs: int, kernel_size: int, stride: int) -> list[nn.Module]:
    # Padding (k - 1) // 2: 1 for both the 3x3 and the 4x4 convs, as fastai's ``custom_conv_layer``.
    return [SpectralNormConv2d(in_chs, out_chs, kernel_size, stride=stride), nn.ReLU(inplace=True)]


class Discriminator(nn.Module):
    """DDColor's patch discriminator (official ``DynamicUNetDiscriminator(n_channels=3, nf=64)``).

    Layout, every conv spectral-normed (:class:`SpectralNormConv2d`, with bias unless stated) and followed by a
    plain ReLU except the last, no normalisation layers::

        conv4x4 s2 (in -> nf)
        3 x [conv3x3 s1 (c -> c), conv4x4 s2 (c -> 2c)]   + SelfAttention(2c) after the first downsample
        conv3x3 s1 (8nf -> 8nf), conv4x4 s1 padding 0 (8nf -> 1, no bias, no activation)

    The 4x4 stride-2 convs use padding 1 and halve the size: 256 -> 128 -> 64 -> 32 -> 16, then the final
    4x4 valid conv gives 13 x 13, i.e. ``(B, 169)`` logits at 256 px (``(B, 1)`` at 64 px; inputs need at least
    64 px). The self-attention runs at 1/4 resolution (a 4096 x 4096 attention map per image at 256 px).

    With ``nf=64``: 5,919,617 parameters (5.92 M, as the official model), attention (also spectral) included.

    Input: RGB in [0, 1], no normalisation. Output: raw logits, shape (B, N).

    Args:
        nf: base channels.
        in_chs: input channels.
    """

    def __init__(self, nf: int = 64, in_chs: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = _sn_conv_relu(in_chs, nf, 4, 2)
        c = nf
        for i in range(3):
            layers += _sn_conv_relu(c, c, 3, 1)
            layers += _sn_conv_relu(c, 2 * c, 4, 2)
            if i == 0:
                layers.append(SelfAttention(2 * c))
            c *= 2
        layers += _sn_conv_relu(c, c, 3, 1)
        layers.append(SpectralNormConv2d(c, 1, 4, stride=1, padding=0, bias=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """Patch logits, (B, 3, H, W) in [0, 1] -> (B, N)."""
        return self.layers(rgb).flatten(1)


def gan_loss(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Vanilla GAN loss: ``BCEWithLogits(logits, 1 if target_is_real else 0)``, mean over all elements."""
    target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


# --- the combined loss ------------------------------------------------------------------------------------
@dataclass
class LossWeights:
    """Weights of DDColor's generator loss terms (official values by default) and the GT color-enhance factor.

    Attributes:
        pixel: L1 on ab.
        perceptual: VGG16-BN perceptual loss.
        gan: adversarial (generator side).
        colorfulness: ``1 - CF`` (batch mean, see the module docstring).
        use_colorfulness: add the colorfulness term at all (``False`` for the official "artistic" recipe).
        color_enhance_factor: saturation boost of the ground truth used by the perceptual loss and as the
            discriminator's real samples; 1 = off.
    """

    pixel: float = 0.1
    perceptual: float = 5.0
    gan: float = 1.0
    colorfulness: float = 0.5
    use_colorfulness: bool = True
    color_enhance_factor: float = 1.2

    @classmethod
    def from_config(cls, train_config: Any) -> LossWeights:
        """From a :class:`ddcolor.config.TrainConfig` (``loss_pixel``, ``loss_perceptual``, ... fields)."""
        return cls(
            pixel=train_config.loss_pixel,
            perceptual=train_config.loss_perceptual,
            gan=train_config.loss_gan,
            colorfulness=train_config.loss_colorfulness,
            use_colorfulness=train_config.use_colorfulness_loss,
            color_enhance_factor=train_config.color_enhance_factor,
        )


class DDColorLoss(nn.Module):
    """Generator and discriminator losses of DDColor training, from Lab tensors.

    Inputs everywhere: ``pred_ab`` (B, 2, H, W) network output and ``ab`` (B, 2, H, W) ground truth, in Lab units;
    ``l`` (B, 1, H, W) lightness in [0, 100].

    The discriminator is passed per call and is not a submodule. ``generator_loss`` backpropagates through it, so
    its parameters receive gradients unless the caller freezes them (``requires_grad_(False)``) during the
    generator step, as BasicSR does. Both calls run the discriminator forward in whatever mode it is in; in train
    mode each forward advances the spectral-norm power iteration, as upstream.

    Args:
        weights: term weights; a weight of 0 (or ``use_colorfulness=False``) skips the term.
        perceptual: the perceptual loss module (registered as a submodule; frozen).
    """

    def __init__(self, weights: LossWeights, perceptual: PerceptualLoss) -> None:
        super().__init__()
        self.weights = weights
        self.perceptual = perceptual

    def _pred_rgb(self, pred_ab: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
        return lab_to_rgb(torch.cat([l, pred_ab], dim=1), clamp=True)

    def _gt_rgb(self, l: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:  # noqa: E741
        with torch.no_grad():
            rgb = lab_to_rgb(torch.cat([l, ab], dim=1), clamp=True)
            if self.weights.color_enhance_factor != 1.0:
                rgb = color_enhance(rgb, self.weights.color_enhance_factor)
        return rgb

    def generator_loss(
        self,
        pred_ab: torch.Tensor,
        l: torch.Tensor,  # noqa: E741
        ab: torch.Tensor,
        discriminator: nn.Module | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted generator loss.

        Args:
            pred_ab: predicted ab (B, 2, H, W).
            l: lightness (B, 1, H, W).
            ab: ground-truth ab (B, 2, H, W), not enhanced (the enhancement is applied here).
            discriminator: the critic; may be ``None`` only when ``weights.gan == 0``.

        Returns:
            ``(total, terms)``: ``total`` is the differentiable weighted sum; ``terms`` holds the detached,
            UNWEIGHTED values of the computed terms among ``pixel``, ``perceptual``, ``gan``, ``colorfulness``,
            plus the detached ``total``.
        """
        w = self.weights
        pred_rgb = self._pred_rgb(pred_ab, l)
        terms: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []

        def add(name: str, weight: float, value: torch.Tensor) -> None:
            terms[name] = value.detach()
            weighted.append(weight * value)

        if w.pixel:
            add("pixel", w.pixel, F.l1_loss(pred_ab, ab))
        if w.perceptual:
            add("perceptual", w.perceptual, self.perceptual(pred_rgb, self._gt_rgb(l, ab)))
        if w.gan:
            if discriminator is None:
                raise ValueError("generator_loss needs a discriminator when weights.gan != 0")
            add("gan", w.gan, gan_loss(discriminator(pred_rgb), True))
        if w.use_colorfulness and w.colorfulness:
            add("colorfulness", w.colorfulness, colorfulness_loss(pred_rgb, reduction="mean"))
        total = sum(weighted[1:], weighted[0]) if weighted else pred_ab.sum() * 0.0
        terms["total"] = total.detach()
        return total, terms

    def discriminator_loss(
        self,
        pred_ab: torch.Tensor,
        l: torch.Tensor,  # noqa: E741
        ab: torch.Tensor,
        discriminator: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``BCE(D(enhanced gt_rgb), real) + BCE(D(pred_rgb.detach()), fake)``; no gradient reaches ``pred_ab``.

        Returns:
            ``(d_total, {"d_real", "d_fake", "d_total"})``, the dict values detached.
        """
        pred_rgb = self._pred_rgb(pred_ab.detach(), l.detach())
        d_real = gan_loss(discriminator(self._gt_rgb(l, ab)), True)
        d_fake = gan_loss(discriminator(pred_rgb), False)
        d_total = d_real + d_fake
        return d_total, {"d_real": d_real.detach(), "d_fake": d_fake.detach(), "d_total": d_total.detach()}
