"""Tests for ddcolor.losses: color enhancement, perceptual loss, discriminator, GAN loss and the combined loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ddcolor import weights
from ddcolor.color import colorfulness_loss, lab_to_rgb, rgb_to_lab
from ddcolor.config import TrainConfig
from ddcolor.losses import (
    DDColorLoss,
    Discriminator,
    LossWeights,
    PerceptualLoss,
    color_enhance,
    gan_loss,
    vgg16_bn_layer_names,
)
from ddcolor.model.layers import SpectralNormConv2d

SIZE = 64


@pytest.fixture(scope="module")
def perceptual() -> PerceptualLoss:
    torch.manual_seed(0)
    return PerceptualLoss(pretrained=None)


@pytest.fixture(scope="module")
def disc() -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(nf=8)  # small but same layout: fast tests


def lab_batch(b: int = 2, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lab = rgb_to_lab(torch.rand(b, 3, size, size, generator=g))
    return lab[:, :1], lab[:, 1:]


# --- color_enhance -----------------------------------------------------------------------------------------
def color_enhance_np(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Reference: official basicsr/utils/color_enhance.py with torchvision Grayscale's luma weights."""
    gray = 0.2989 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    gray = np.repeat(gray[:, None], 3, axis=1)
    return np.clip(gray + factor * (rgb - gray), 0.0, 1.0)


@pytest.mark.parametrize("factor", [0.5, 1.2, 2.0])
def test_color_enhance_matches_numpy(factor):
    rgb = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = color_enhance(rgb, factor)
    np.testing.assert_allclose(out.numpy(), color_enhance_np(rgb.numpy(), factor), atol=1e-12)
    assert out.min() >= 0 and out.max() <= 1


def test_color_enhance_matches_torchvision_grayscale_transform():
    rgb = torch.rand(1, 3, 8, 8)
    gray = torchvision.transforms.Grayscale(3)(rgb)
    torch.testing.assert_close(color_enhance(rgb, 1.2), (gray + 1.2 * (rgb - gray)).clamp(0, 1))


def test_color_enhance_factor_one_is_identity_and_gray_is_fixed():
    rgb = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(color_enhance(rgb, 1.0), rgb)
    gray = torch.rand(2, 1, 16, 16).expand(2, 3, 16, 16)
    # torchvision luma weights sum to 0.9999, so a gray pixel moves by 0.5 * 1e-4 * value at factor 1.5
    torch.testing.assert_close(color_enhance(gray, 1.5), gray, atol=1e-4, rtol=0)


def test_color_enhance_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        color_enhance(torch.rand(3, 8, 8))


# --- PerceptualLoss ----------------------------------------------------------------------------------------
def test_perceptual_zero_for_identical_positive_otherwise(perceptual):
    x = torch.rand(2, 3, SIZE, SIZE)
    assert perceptual(x, x.clone()).item() == 0.0
    assert perceptual(x, torch.rand(2, 3, SIZE, SIZE)).item() > 0.0


def test_perceptual_gradient_to_pred_only(perceptual):
    pred = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    target = torch.rand(1, 3, SIZE, SIZE, requires_grad=True)
    perceptual(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(not p.requires_grad and p.grad is None for p in perceptual.parameters())


def test_perceptual_layers_are_vgg16_bn_convs(perceptual):
    assert perceptual.layer_indices == {"conv1_1": 0, "conv2_1": 7, "conv3_1": 14, "conv4_1": 24, "conv5_1": 34}
    for idx in perceptual.layer_indices.values():
        assert isinstance(perceptual.vgg[idx], nn.Conv2d)
    assert len(perceptual.vgg) == 35  # truncated right after conv5_1
    assert len(vgg16_bn_layer_names()) == len(
        torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], True)
    )
    # Same layout as torchvision's vgg16_bn().features (compared module by module, without the classifier).
    reference = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)[:35]
    assert [repr(m) for m in perceptual.vgg] == [repr(m) for m in reference]
    assert set(perceptual.state_dict()) == {f"vgg.{k}" for k in reference.state_dict()}  # mean/std not persisted


def test_perceptual_stays_eval_and_frozen(perceptual):
    perceptual.train()
    assert not perceptual.training and not any(m.training for m in perceptual.modules())
    wrapper = nn.Sequential(perceptual)
    wrapper.train()
    assert not perceptual.vgg.training


def test_perceptual_custom_layers_and_errors():
    loss = PerceptualLoss(pretrained=None, layer_weights={"conv2_2": 1.0})
    assert len(loss.vgg) == 11
    with pytest.raises(ValueError, match="Unknown VGG16-BN layers"):
        PerceptualLoss(pretrained=None, layer_weights={"conv9_1": 1.0})
    with pytest.raises(ValueError, match="pretrained"):
        PerceptualLoss(pretrained="laion", layer_weights={"conv1_1": 1.0})


def test_perceptual_missing_weights_raise(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(weights.WeightsNotFoundError, match="ddcolor weights fetch vgg16_bn"):
        PerceptualLoss(pretrained="imagenet")


def test_perceptual_loads_cached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "cache"))
    # A fake file cannot carry the real sha256 prefix (6c64b313) of the torchvision file name: drop the check.
    spec = dataclasses.replace(weights.get_spec("vgg16_bn"), sha256_prefix=None)
    monkeypatch.setattr(weights, "REGISTRY", {**weights.REGISTRY, "vgg16_bn": spec})
    torch.manual_seed(1)
    # torchvision's vgg16_bn layout, without the 120 M-parameter classifier (keeps the fake file ~60 MB).
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    with torch.no_grad():
        for m in features:
            if isinstance(m, nn.BatchNorm2d):  # non-trivial stats so a skipped load would be noticed
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)  # non-feature keys of the real file are ignored
    src = tmp_path / spec.filename
    torch.save(state, src)
    weights.import_file(src, "vgg16_bn")

    loss = PerceptualLoss(pretrained="imagenet")
    for k, v in loss.vgg.state_dict().items():
        torch.testing.assert_close(v, state[f"features.{k}"], rtol=0, atol=0)
    x, y = torch.rand(1, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)
    features.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        fx, fy = features[:8]((x - mean) / std), features[:8]((y - mean) / std)
    expected_conv2_1 = F.l1_loss(fx, fy)
    only_conv2_1 = PerceptualLoss(pretrained="imagenet", layer_weights={"conv2_1": 1.0})
    torch.testing.assert_close(only_conv2_1(x, y), expected_conv2_1)


# --- Discriminator -----------------------------------------------------------------------------------------
def test_discriminator_full_size_params_and_output():
    torch.manual_seed(0)
    d = Discriminator()
    assert sum(p.numel() for p in d.parameters()) == 5_919_617  # official DynamicUNetDiscriminator: 5.92 M
    with torch.no_grad():
        assert d(torch.rand(1, 3, 256, 256)).shape == (1, 169)  # 13 x 13 patches
        assert d(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 1)


def test_discriminator_layout(disc):
    convs = [m for m in disc.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, SpectralNormConv2d))]
    assert all(isinstance(m, SpectralNormConv2d) for m in convs)  # attention included
    assert len(convs) == 9 + 3  # 9 main convs + query/key/value
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LeakyReLU)) for m in disc.modules())
    last = disc.layers[-1]
    assert isinstance(last, SpectralNormConv2d) and last.bias is None and last.padding == 0
    assert disc(torch.rand(3, 3, 128, 128)).shape == (3, 25)  # 128 -> 8 -> 5 x 5


def test_discriminator_attention_starts_as_identity(disc):
    attn = next(m for m in disc.modules() if type(m).__name__ == "SelfAttention")
    assert attn.gamma.item() == 0.0
    x = torch.randn(1, attn.value.weight_orig.shape[0], 8, 8)
    torch.testing.assert_close(attn(x), x)


# --- gan_loss ----------------------------------------------------------------------------------------------
def test_gan_loss_matches_manual_bce():
    logits = torch.randn(4, 169)
    p = torch.sigmoid(logits)
    torch.testing.assert_close(gan_loss(logits, True), -torch.log(p).mean())
    torch.testing.assert_close(gan_loss(logits, False), -torch.log(1 - p).mean())
    assert gan_loss(torch.zeros(2, 5), True).item() == pytest.approx(np.log(2))


# --- LossWeights / DDColorLoss -----------------------------------------------------------------------------
def test_loss_weights_defaults_and_from_config():
    assert LossWeights() == LossWeights.from_config(TrainConfig())
    w = LossWeights.from_config(TrainConfig(loss_gan=0.0, use_colorfulness_loss=False, color_enhance_factor=1.0))
    assert (w.gan, w.use_colorfulness, w.color_enhance_factor, w.perceptual) == (0.0, False, 1.0, 5.0)


def test_generator_loss_terms_and_total(perceptual, disc):
    crit = DDColorLoss(LossWeights(), perceptual)
    light, ab = lab_batch()
    pred_ab = (ab + 10 * torch.randn_like(ab)).requires_grad_(True)
    total, terms = crit.generator_loss(pred_ab, light, ab, disc)
    assert set(terms) == {"pixel", "perceptual", "gan", "colorfulness", "total"}
    assert all(not v.requires_grad and v.ndim == 0 for v in terms.values())
    w = LossWeights()
    expected = (
        w.pixel * terms["pixel"]
        + w.perceptual * terms["perceptual"]
        + w.gan * terms["gan"]
        + w.colorfulness * terms["colorfulness"]
    )
    torch.testing.assert_close(total.detach(), expected)
    torch.testing.assert_close(terms["total"], expected)

    # Individual terms are what their definitions say.
    torch.testing.assert_close(terms["pixel"], F.l1_loss(pred_ab, ab).detach())  # original ab, not enhanced
    pred_rgb = lab_to_rgb(torch.cat([light, pred_ab.detach()], 1))
    gt_rgb = color_enhance(lab_to_rgb(torch.cat([light, ab], 1)), 1.2)
    torch.testing.assert_close(terms["perceptual"], perceptual(pred_rgb, gt_rgb))
    torch.testing.assert_close(terms["colorfulness"], colorfulness_loss(pred_rgb, reduction="mean"))

    disc.zero_grad(set_to_none=True)
    total.backward()
    assert pred_ab.grad is not None and pred_ab.grad.abs().sum() > 0
    disc.zero_grad(set_to_none=True)


def test_generator_loss_colorfulness_disabled(perceptual, disc):
    crit = DDColorLoss(LossWeights(use_colorfulness=False), perceptual)
    light, ab = lab_batch()
    _, terms = crit.generator_loss(ab.clone(), light, ab, disc)
    assert "colorfulness" not in terms and {"pixel", "perceptual", "gan"} <= set(terms)
    assert terms["pixel"].item() == 0.0


def test_zero_weight_skips_compute(disc):
    class Exploding(PerceptualLoss):
        def forward(self, *args):
            raise AssertionError("perceptual loss computed with weight 0")

    calls = []

    class CountingD(nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return disc(x)

    crit = DDColorLoss(LossWeights(perceptual=0.0, colorfulness=0.0), Exploding(None, {"conv1_1": 1.0}))
    light, ab = lab_batch(b=1)
    pred_ab = torch.zeros_like(ab, requires_grad=True)
    total, terms = crit.generator_loss(pred_ab, light, ab, CountingD())
    assert set(terms) == {"pixel", "gan", "total"} and len(calls) == 1
    crit.weights = LossWeights(perceptual=0.0, gan=0.0, use_colorfulness=False)
    total, terms = crit.generator_loss(pred_ab, light, ab, None)  # no discriminator needed
    assert set(terms) == {"pixel", "total"} and len(calls) == 1
    torch.testing.assert_close(total, 0.1 * F.l1_loss(pred_ab, ab))
    crit.weights = LossWeights(pixel=0.0, perceptual=0.0, gan=0.0, use_colorfulness=False)
    total, terms = crit.generator_loss(pred_ab, light, ab, None)
    assert terms == {"total": torch.tensor(0.0)}
    total.backward()  # still a graph, so a trainer's backward does not fail
    with pytest.raises(ValueError, match="discriminator"):
        DDColorLoss(LossWeights(perceptual=0.0), crit.perceptual).generator_loss(pred_ab, light, ab, None)


def test_discriminator_loss_gradient_reaches_d_only(perceptual, disc):
    crit = DDColorLoss(LossWeights(), perceptual)
    light, ab = lab_batch()
    pred_ab = (ab + 10 * torch.randn_like(ab)).requires_grad_(True)
    disc.zero_grad(set_to_none=True)
    d_total, terms = crit.discriminator_loss(pred_ab, light, ab, disc)
    assert set(terms) == {"d_real", "d_fake", "d_total"}
    torch.testing.assert_close(terms["d_total"], terms["d_real"] + terms["d_fake"])
    d_total.backward()
    assert pred_ab.grad is None
    grads = [p.grad for p in disc.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    disc.zero_grad(set_to_none=True)

    # Real samples are the color-enhanced ground truth.
    disc.eval()
    try:
        with torch.no_grad():
            gt = color_enhance(lab_to_rgb(torch.cat([light, ab], 1)), 1.2)
            _, terms = crit.discriminator_loss(pred_ab, light, ab, disc)
            torch.testing.assert_close(terms["d_real"], gan_loss(disc(gt), True))
    finally:
        disc.train()


def test_ddcolor_loss_train_keeps_perceptual_eval(perceptual):
    crit = DDColorLoss(LossWeights(), perceptual).train()
    assert not crit.perceptual.training
    assert not any(p.requires_grad for p in crit.parameters())
