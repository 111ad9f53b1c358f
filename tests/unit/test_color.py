"""Tests for ddcolor.color: Lab conversions against scikit-image, gray input, colorfulness."""

import warnings

import numpy as np
import pytest
import torch
from skimage import color as skcolor
from skimage import data as skdata

from ddcolor.color import (
    colorfulness,
    colorfulness_loss,
    colorfulness_np,
    gray_rgb_from_l,
    lab_to_rgb,
    rgb_to_lab,
)

DTYPES = [torch.float32, torch.float64]
PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


def to_bchw(hwc: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None].to(dtype)


def to_hwc(bchw: torch.Tensor) -> np.ndarray:
    return bchw[0].permute(1, 2, 0).double().numpy()


def random_rgb(n: int = 10_000, seed: int = 0) -> np.ndarray:
    """n random colors as a (100, n // 100, 3) float64 image in [0, 1], with black and white included."""
    rgb = np.random.default_rng(seed).random((n, 3))
    rgb[:2] = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    return rgb.reshape(100, n // 100, 3)


def assert_lab_close(ours: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(ours[..., 0], ref[..., 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours[..., 1:], ref[..., 1:], rtol=0, atol=1e-2)


def colorfulness_reference(image: np.ndarray, ddof: int = 0) -> float:
    """Textbook Hasler & Suesstrunk (absolute-value variant) on an (H, W, 3) RGB image."""
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    rg = np.abs(r - g)
    yb = np.abs(0.5 * (r + g) - b)
    std_root = np.sqrt(np.std(rg, ddof=ddof) ** 2 + np.std(yb, ddof=ddof) ** 2)
    mean_root = np.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2)
    return float(std_root + 0.3 * mean_root)


# --- rgb_to_lab / lab_to_rgb against scikit-image ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_rgb_to_lab_matches_skimage_random(dtype):
    rgb = random_rgb()
    lab = rgb_to_lab(to_bchw(rgb, dtype))
    assert lab.dtype == dtype and lab.shape == (1, 3, *rgb.shape[:2])
    assert_lab_close(to_hwc(lab), skcolor.rgb2lab(rgb))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_rgb_to_lab_matches_skimage_photos(name, dtype):
    rgb = PHOTOS[name]() / 255.0
    assert_lab_close(to_hwc(rgb_to_lab(to_bchw(rgb, dtype))), skcolor.rgb2lab(rgb))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_lab_to_rgb_matches_skimage_photos(name, dtype):
    lab = skcolor.rgb2lab(PHOTOS[name]() / 255.0)
    out = lab_to_rgb(to_bchw(lab, dtype))
    assert out.dtype == dtype
    np.testing.assert_allclose(to_hwc(out), skcolor.lab2rgb(lab), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lab_to_rgb_matches_skimage_random_in_gamut(dtype):
    lab = skcolor.rgb2lab(random_rgb(seed=1))
    out = to_hwc(lab_to_rgb(to_bchw(lab, dtype)))
    np.testing.assert_allclose(out, skcolor.lab2rgb(lab), rtol=0, atol=1e-5)


def test_lab_to_rgb_matches_skimage_out_of_gamut():
    """Arbitrary Lab, including negative Z that skimage clips (and warns about), and RGB clamping."""
    rng = np.random.default_rng(2)
    lab = np.stack(
        [rng.uniform(0, 100, 10_000), rng.uniform(-128, 127, 10_000), rng.uniform(-128, 127, 10_000)],
        axis=-1,
    ).reshape(100, 100, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = skcolor.lab2rgb(lab)
    out = lab_to_rgb(to_bchw(lab, torch.float64))
    np.testing.assert_allclose(to_hwc(out), ref, rtol=0, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    unclamped = lab_to_rgb(to_bchw(lab, torch.float64), clamp=False)
    assert unclamped.min() < 0 and unclamped.max() > 1
    torch.testing.assert_close(unclamped.clamp(0, 1), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_identity(dtype):
    rgb = to_bchw(random_rgb(seed=3), dtype)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, rtol=0, atol=1e-5)


def test_known_values():
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64).T.reshape(1, 3, 1, 2)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(lab[0, 0, 0], torch.tensor([0.0, 100.0], dtype=torch.float64), atol=1e-3, rtol=0)
    assert lab[:, 1:].abs().max() < 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_equals_per_image(dtype):
    # float32 matmuls may take a different path per batch size; a and b amplify that by 500 and 200.
    tol = {"rtol": 0, "atol": 1e-4} if dtype == torch.float32 else {}
    rgb = torch.rand(4, 3, 8, 9, generator=torch.Generator().manual_seed(0), dtype=dtype)
    lab = rgb_to_lab(rgb)
    torch.testing.assert_close(lab, torch.cat([rgb_to_lab(x[None]) for x in rgb]), **tol)
    back = lab_to_rgb(lab)
    torch.testing.assert_close(back, torch.cat([lab_to_rgb(x[None]) for x in lab]), **tol)
    l = lab[:, :1]  # noqa: E741
    torch.testing.assert_close(gray_rgb_from_l(l), torch.cat([gray_rgb_from_l(x[None]) for x in l]), **tol)
    cf = torch.cat([colorfulness(x[None] * 255) for x in rgb])
    torch.testing.assert_close(colorfulness(rgb * 255), cf, **tol)


# --- gradients ------------------------------------------------------------------------------------------


def test_gradcheck_away_from_thresholds():
    gen = torch.Generator().manual_seed(0)
    rgb = (0.2 + 0.6 * torch.rand(1, 3, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(rgb_to_lab, (rgb,))
    lab = rgb_to_lab(rgb).detach().requires_grad_()
    assert torch.autograd.gradcheck(lab_to_rgb, (lab,))
    l = (20 + 60 * torch.rand(1, 1, 3, 4, generator=gen, dtype=torch.float64)).requires_grad_()  # noqa: E741
    assert torch.autograd.gradcheck(gray_rgb_from_l, (l,))
    assert torch.autograd.gradcheck(colorfulness_loss, (rgb,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_grads_finite_at_boundaries(dtype):
    edge = [0.0, 1.0, 0.04045, 0.0031308, 0.5, -0.01, 1.01]
    rgb = torch.tensor(edge, dtype=dtype).repeat(3, 1)[None, :, None, :].requires_grad_()
    rgb_to_lab(rgb).sum().backward()
    assert torch.isfinite(rgb.grad).all()

    lab = torch.tensor(
        [[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [50.0, 120.0, -120.0], [50.0, -120.0, 127.0], [8.0, 0.0, 0.0]],
        dtype=dtype,
    ).T[None, :, None, :]
    for clamp in (True, False):
        lab_leaf = lab.clone().requires_grad_()
        lab_to_rgb(lab_leaf, clamp=clamp).sum().backward()
        assert torch.isfinite(lab_leaf.grad).all()

    l = torch.tensor([0.0, 100.0, 50.0], dtype=dtype)[None, None, None, :].requires_grad_()  # noqa: E741
    gray_rgb_from_l(l).sum().backward()
    assert torch.isfinite(l.grad).all()

    for image in (torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)):
        image = image.to(dtype).requires_grad_()
        colorfulness_loss(image).backward()
        assert torch.isfinite(image.grad).all()


# --- gray network input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_gray_rgb_from_l(dtype):
    l = torch.linspace(0, 100, 101, dtype=dtype).reshape(1, 1, 1, 101).repeat(2, 1, 3, 1)  # noqa: E741
    gray = gray_rgb_from_l(l)
    assert gray.shape == (2, 3, 3, 101) and gray.dtype == dtype
    assert gray.min() >= 0 and gray.max() <= 1
    assert (gray.amax(dim=1) - gray.amin(dim=1)).max() < 1e-4
    lab = rgb_to_lab(gray)
    torch.testing.assert_close(lab[:, :1], l, rtol=0, atol=1e-3)
    assert lab[:, 1:].abs().max() < 1e-2


# --- colorfulness ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_colorfulness_matches_reference(name):
    image = PHOTOS[name]()
    ref = colorfulness_reference(image)
    assert colorfulness_np(image) == pytest.approx(ref, rel=1e-12)
    ours = colorfulness(to_bchw(image.astype(np.float64), torch.float64))
    assert ours.shape == (1,)
    assert ours.item() == pytest.approx(ref, rel=1e-10)
    assert colorfulness(to_bchw(image, torch.float32)).item() == pytest.approx(ref, rel=1e-4)


def test_colorfulness_gray_is_zero_and_saturated_is_larger():
    gray = np.repeat(skdata.camera()[:64, :64, None], 3, axis=-1)
    assert colorfulness_np(gray) == 0.0
    assert colorfulness(to_bchw(gray, torch.float64)).item() == 0.0

    photo = skdata.coffee()
    saturated = (skcolor.hsv2rgb(np.clip(skcolor.rgb2hsv(photo) * [1, 2, 1], 0, 1)) * 255).round()
    saturated = saturated.astype(np.uint8)
    assert colorfulness_np(saturated) > colorfulness_np(photo) > colorfulness_np(gray)
    batch = torch.cat([to_bchw(x, torch.float64) for x in (gray[:64, :64], photo[:64, :64], saturated[:64, :64])])
    cf = colorfulness(batch)
    assert cf[0] == 0 and cf[2] > cf[1] > 0


def test_colorfulness_loss_matches_official_form():
    images = [skdata.astronaut()[:96, :96], skdata.coffee()[:96, :96], skdata.chelsea()[:96, :96]]
    batch = torch.cat([to_bchw(x / 255.0, torch.float64) for x in images])
    per_image = colorfulness_loss(batch, reduction="none")
    ref = torch.tensor([1 - colorfulness_reference(x / 255.0, ddof=1) for x in images], dtype=torch.float64)
    torch.testing.assert_close(per_image, ref, rtol=0, atol=2e-4)  # eps inside sqrt: <= 1.3e-4
    torch.testing.assert_close(colorfulness_loss(batch, eps=0.0, reduction="none"), ref)
    # CF on [0, 1] is CF_255 / 255, up to the biased/unbiased std difference.
    torch.testing.assert_close(1 - per_image, colorfulness(batch * 255) / 255, rtol=1e-3, atol=2e-4)

    mean = colorfulness_loss(batch)
    total = colorfulness_loss(batch, reduction="sum")
    assert mean.ndim == 0 and total.ndim == 0
    torch.testing.assert_close(total, mean * len(images))
    torch.testing.assert_close(mean, per_image.mean())


def test_colorfulness_loss_gradient_flows():
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    colorfulness_loss(rgb).backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    # Minimizing 1 - CF must increase colorfulness.
    with torch.no_grad():
        more = (rgb - 0.1 * rgb.grad / rgb.grad.abs().max()).clamp(0, 1)
        assert colorfulness_loss(more) < colorfulness_loss(rgb)


# --- input validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "shape"),
    [
        (rgb_to_lab, (3, 4, 4)),
        (rgb_to_lab, (1, 4, 4, 3)),
        (rgb_to_lab, (1, 1, 4, 4)),
        (lab_to_rgb, (3, 4, 4)),
        (lab_to_rgb, (2, 2, 4, 4)),
        (gray_rgb_from_l, (1, 3, 4, 4)),
        (gray_rgb_from_l, (1, 4, 4)),
        (colorfulness, (3, 4, 4)),
        (colorfulness_loss, (1, 4, 4, 3)),
    ],
)
def test_bad_shapes_raise(fn, shape):
    with pytest.raises(ValueError, match=r"must have shape \(B, [13], H, W\).*got shape"):
        fn(torch.rand(shape))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        colorfulness_np(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="reduction"):
        colorfulness_loss(torch.rand(1, 3, 4, 4), reduction="avg")
    with pytest.raises(ValueError, match="2 pixels"):
        colorfulness_loss(torch.rand(1, 3, 1, 1))
    with pytest.raises(TypeError, match="floating point"):
        rgb_to_lab(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        rgb_to_lab(np.zeros((1, 3, 2, 2)))


def test_rgb_uint8_to_lab_matches_the_float_path():
    from ddcolor.color import rgb_uint8_to_lab

    photo = torch.from_numpy(skdata.coffee()).permute(2, 0, 1)[None]  # uint8 (1, 3, H, W)
    exact = rgb_to_lab(photo.double() / 255)
    assert torch.allclose(rgb_uint8_to_lab(photo).double(), exact, atol=1e-4)
    with pytest.raises(TypeError, match="uint8"):
        rgb_uint8_to_lab(photo.float())
