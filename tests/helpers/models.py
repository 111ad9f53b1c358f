"""Model helpers for tests: non-trivial normalisation statistics, so that folding them into convolutions is tested."""

from __future__ import annotations

import torch
from torch import nn

from ddcolor.model import DDColor


def randomise_norms(model: DDColor, seed: int = 0) -> DDColor:
    """Non-trivial BatchNorm statistics and affines (some scales negative), LayerNorm affines, layer scales."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(1 + 0.5 * torch.randn(n, generator=generator))
                module.bias.copy_(0.3 * torch.randn(n, generator=generator))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            gamma = getattr(module, "gamma", None)
            if isinstance(gamma, torch.Tensor):
                gamma.copy_(0.5 + torch.rand(gamma.shape, generator=generator))
    return model.eval()
