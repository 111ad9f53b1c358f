"""Inference preparation: an eval-only DDColor that computes the same function with less work.

Exact-algebra rewrites only (fp32 results match the training module to float rounding):
- spectral norm folded into plain conv weights (W / sigma computed once);
- eval-mode BatchNorm that directly follows a conv folded into that conv;
- the refine 1x1 conv folded into the color embeddings, so the (B, 100, H, W) query maps are never built:
  refine([maps || x]) = einsum(W_q @ color_embed, pixel_embedding) + W_x x + b.
Lower precisions run under autocast and return float32 ab.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ddcolor.model.ddcolor import DDColor
from ddcolor.model.layers import SpectralNormConv2d

__all__ = ["InferenceDDColor", "prepare_for_inference"]

_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _plain_conv(sn_conv: SpectralNormConv2d) -> nn.Conv2d:
    weight = sn_conv.normalized_weight().detach()
    out_chs, in_chs, k, _ = weight.shape
    conv = nn.Conv2d(in_chs, out_chs, k, stride=sn_conv.stride, padding=sn_conv.padding, bias=True)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(sn_conv.bias.detach() if sn_conv.bias is not None else torch.zeros(out_chs))
    return conv


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
    conv.weight.data.mul_(scale.view(-1, 1, 1, 1))
    conv.bias.data.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    return conv


def _fold_sequential(module: nn.Module) -> None:
    """Replace spectral convs by plain convs everywhere, folding a directly following BatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential) and len(child) and isinstance(child[0], SpectralNormConv2d):
            layers = [_plain_conv(child[0]), *list(child)[1:]]
            if len(layers) > 1 and isinstance(layers[1], nn.BatchNorm2d):
                layers = [_fold_bn(layers[0], layers[1]), *layers[2:]]
            setattr(module, name, nn.Sequential(*layers))
        else:
            _fold_sequential(child)


class InferenceDDColor(nn.Module):
    """Eval-only DDColor with the refine conv folded into the color embeddings (see module docstring).

    Takes and returns the same tensors as `DDColor.forward`: gray RGB (B, 3, H, W) float32 in [0, 1] ->
    ab (B, 2, H, W) float32 in Lab units.
    """

    def __init__(self, model: DDColor, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        model = copy.deepcopy(model).eval()
        refine = _plain_conv(model.refine)
        _fold_sequential(model)
        num_queries = model.config.num_queries
        weight = refine.weight.detach()[:, :, 0, 0]  # (2, Q + 3)
        self.register_buffer("mean", model.mean)
        self.register_buffer("std", model.std)
        self.register_buffer("ab_from_queries", weight[:, :num_queries].clone())  # (2, Q)
        self.image_conv = nn.Conv2d(3, weight.shape[0], kernel_size=1)  # the W_x x + b part of refine
        self.image_conv.weight.data.copy_(weight[:, num_queries:, None, None])
        self.image_conv.bias.data.copy_(refine.bias.detach())
        self.encoder = model.encoder
        self.pixel_decoder = model.pixel_decoder
        self.color_decoder = model.color_decoder
        self.precision = precision
        self.eval()
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, gray_rgb: torch.Tensor) -> torch.Tensor:
        x = (gray_rgb.float() - self.mean) / self.std
        dtype = _PRECISIONS[self.precision]
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            multi_scale, pixel_embedding = self.pixel_decoder(self.encoder(x))
            color_embed = self.color_decoder.query_embeddings(multi_scale)  # (B, Q, C)
            ab_embed = torch.einsum("oq,bqc->boc", self.ab_from_queries.to(color_embed.dtype), color_embed)  # (B, 2, C)
            ab = torch.einsum("boc,bchw->bohw", ab_embed, pixel_embedding.to(ab_embed.dtype))  # (B, 2, H, W)
        return ab.float() + self.image_conv(x)


def prepare_for_inference(model: DDColor, precision: str = "fp32") -> InferenceDDColor:
    """Return an eval-only copy of `model` that computes the same ab faster; `model` is not modified.

    Args:
        model: a trained `DDColor`.
        precision: "fp32" (same function, exact algebra), "bf16" or "fp16" (heavy layers under autocast).
    """
    return InferenceDDColor(model, precision=precision)
