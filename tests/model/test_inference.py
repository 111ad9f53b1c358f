"""`prepare_for_inference`: the folded eval network computes the eager function (fp32) or close to it (bf16/fp16).

Every model is random-init (`pretrained=None`) with randomised BatchNorm statistics and affines (negative
scales included), so each fold is exercised with non-trivial values; the tiny test uses the regenerated
official-fixture weights.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ddcolor.model import DDColor, build_model, load_official, prepare_for_inference
from ddcolor.model.inference import InferenceDDColor
from ddcolor.model.layers import SpectralNormConv2d
from tests.helpers.models import randomise_norms
from tests.helpers.official import FIXTURES, fixture_state_dict, load_manifest

FP32_TOL = 1e-4  # max |ab - ab_eager| / (max ab_eager - min ab_eager)
LOW_PRECISION_TOL = 0.02


@pytest.fixture(scope="module")
def atto() -> DDColor:
    torch.manual_seed(0)
    return randomise_norms(build_model("atto", pretrained=None))


def eager(model: DDColor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / (ref.max() - ref.min())).item()


# --- fp32: the same function --------------------------------------------------------------------------


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 96, 160)])
def test_fp32_matches_eager_atto(atto, batch, height, width):
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    ref = eager(atto, x)
    out = prepare_for_inference(atto, "fp32")(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert relative_error(out, ref) <= FP32_TOL
    assert (out - ref).abs().max().item() <= FP32_TOL


@pytest.mark.parametrize("tile_tokens,channels_last", [(None, True), (7, True), (None, False), (32, False)])
def test_fp32_variants_agree(atto, tile_tokens, channels_last):
    """Tiling the last stage (a ragged last tile, per image) and the memory layout change nothing but rounding."""
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    ref = eager(atto, x)
    out = prepare_for_inference(atto, tile_tokens=tile_tokens, channels_last=channels_last)(x)
    assert relative_error(out, ref) <= FP32_TOL


def test_fp32_matches_eager_without_blur_and_fewer_queries():
    torch.manual_seed(1)
    model = randomise_norms(build_model("atto", pretrained=None, blur=False, num_queries=10))
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    net = prepare_for_inference(model)
    assert not net.last_blur and not any(block.blur for block in net.blocks)
    assert relative_error(net(x), eager(model, x)) <= FP32_TOL


def test_normalisation_stays_explicit_when_the_stem_pads(atto):
    """With a padded stem conv the normalisation cannot fold exactly; the prepared net must notice."""
    model = copy.deepcopy(atto)
    model.encoder.backbone.stem_0.padding = (1, 1)  # same output size for 4x4 / stride 4; a different function
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    net = prepare_for_inference(model)
    assert net.normalize_input
    assert relative_error(net(x), eager(model, x)) <= FP32_TOL


@pytest.mark.slow
def test_fp32_and_bf16_match_eager_tiny_official_fixture():
    """Official-layout tiny weights (regenerated fixture) at the parity fixture's input and at 256x320."""
    model = build_model("tiny", pretrained=None)
    load_official(model, {"params": fixture_state_dict(load_manifest()["tiny"])})
    gray = torch.from_numpy(np.load(FIXTURES / "parity_tiny_input.npy"))
    expected = torch.from_numpy(np.load(FIXTURES / "parity_tiny_expected_ab.npy"))  # the official code's output
    fp32 = prepare_for_inference(model, "fp32")
    assert relative_error(fp32(gray), eager(model, gray)) <= FP32_TOL
    assert (fp32(gray) - expected).abs().max().item() <= 1e-4
    x = torch.rand(2, 3, 256, 320, generator=torch.Generator().manual_seed(3))
    ref = eager(model, x)
    assert relative_error(fp32(x), ref) <= FP32_TOL
    assert relative_error(prepare_for_inference(model, "bf16")(x), ref) <= LOW_PRECISION_TOL


# --- low precision --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_within_two_percent_of_range(atto, precision):
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    ref = eager(atto, x)
    net = prepare_for_inference(atto, precision)
    out = net(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= LOW_PRECISION_TOL


def test_low_precision_casts_weights_not_autocast(atto):
    """Heavy layers hold bf16 weights; what needs fp32 (queries, ab projection, position tables) stays fp32."""
    net = prepare_for_inference(atto, "bf16")
    assert net.last_conv.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in net.backbone.parameters())
    assert all(layer.k_proj.weight.dtype == torch.bfloat16 for layer in net.cross_attn)
    assert all(layer.q_proj.weight.dtype == torch.float32 for layer in net.cross_attn)
    assert all(p.dtype == torch.float32 for p in net.color_embed.parameters())
    assert net.ab_from_queries.dtype == torch.float32
    assert net.image_conv.weight.dtype == torch.float32


# --- contract -------------------------------------------------------------------------------------------


def test_input_and_original_model_unchanged(atto):
    model = copy.deepcopy(atto).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(1, 3, 64, 64)
    x_before = x.clone()
    for precision in ("fp32", "bf16"):
        prepare_for_inference(model, precision)(x)
    assert torch.equal(x, x_before)
    assert model.training  # its mode is left alone
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    blocks = [m for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert all(b.gamma is not None for b in blocks)  # layer scale folded in the copy only


def test_eval_without_gradients(atto):
    net = prepare_for_inference(atto)
    assert isinstance(net, InferenceDDColor)
    assert not net.training
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = net(x)
    assert not out.requires_grad and out.grad_fn is None


def test_folds_leave_no_norm_layers_behind(atto):
    """Spectral norm and BatchNorm are gone; no (B, 100, H, W) query maps: the refine conv is folded."""
    net = prepare_for_inference(atto)
    kinds = {type(m) for m in net.modules()}
    assert SpectralNormConv2d not in kinds
    assert nn.BatchNorm2d not in kinds
    assert all(getattr(m, "gamma", None) is None for m in net.modules() if type(m).__name__ == "ConvNeXtBlock")
    assert not net.normalize_input  # ImageNet normalisation folded into the stem conv
    assert net.ab_from_queries.shape == (2, atto.config.num_queries)


def test_encoder_head_and_final_norm_are_not_computed(atto):
    """timm's features_only network ends at the last stage: no classifier head, no final (pooled) norm."""
    backbone = prepare_for_inference(atto).backbone
    names = [name for name, _ in backbone.named_children()]
    assert names[-1] == "stages_3"
    assert not any(n.startswith(("head", "norm_pre", "fc")) for n in names)


@pytest.mark.parametrize("shape", [(1, 3, 48, 64), (1, 3, 64, 80), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_input_shape_is_a_clear_error(atto, shape):
    with pytest.raises(ValueError, match=r"multiple of 32|shape"):
        prepare_for_inference(atto)(torch.rand(*shape))


def test_unknown_precision_is_an_error(atto):
    with pytest.raises(ValueError, match="precision"):
        prepare_for_inference(atto, "int8")
