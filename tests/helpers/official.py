"""Regenerate the official-checkpoint fixture weights described in shared/reference/README.md.

The manifest (`tests/fixtures/official_state_dict_manifest.json`) lists every entry of the official DDColor
`state_dict()`; the values are drawn deterministically per key so the expected output
(`tests/fixtures/parity_tiny_expected_ab.npy`, computed with the official code) can be reproduced.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # tests/fixtures/


def load_manifest() -> dict[str, list[tuple[str, list[int], str]]]:
    return json.loads((FIXTURES / "official_state_dict_manifest.json").read_text())


def fixture_state_dict(entries: list[tuple[str, list[int], str]]) -> dict[str, torch.Tensor]:
    """The reference recipe: per-key seeded float64 normals, scaled by the key's role, cast to float32."""
    state: dict[str, torch.Tensor] = {}
    for key, shape, dtype in entries:
        if "int" in dtype:  # num_batches_tracked
            state[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            x = 1 + 0.1 * x.abs()
        elif leaf == "running_mean":
            x = 0.1 * x
        elif len(shape) >= 2:
            x = x / math.sqrt(math.prod(shape[1:]))
        elif leaf in ("weight", "weight_g"):
            x = 1 + 0.1 * x
        elif leaf == "gamma":
            x = 0.1 + 0.02 * x
        else:
            x = 0.05 * x
        state[key] = x.to(getattr(torch, dtype))
    # spectral norm: u, v = leading singular vectors of the (float32-cast) weight_orig
    for key in list(state):
        if key.endswith(".weight_orig") and key.removesuffix("_orig") + "_u" in state:
            weight = state[key].double().reshape(state[key].shape[0], -1)
            U, _, Vh = torch.linalg.svd(weight, full_matrices=False)
            state[key.removesuffix("_orig") + "_u"] = U[:, 0].float()
            state[key.removesuffix("_orig") + "_v"] = Vh[0].float()
    return state


def random_state_dict(entries: list[tuple[str, list[int], str]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the manifest's shapes (for load tests where values do not matter)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.zeros(shape, dtype=getattr(torch, dtype))
        if "int" in dtype
        else torch.randn(shape, generator=generator).to(getattr(torch, dtype))
        for key, shape, dtype in entries
    }
