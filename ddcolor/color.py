"""Color science for DDColor: sRGB <-> CIELAB, the gray network input, and colorfulness.

Conventions used throughout this module:

* Tensors are batched ``(B, C, H, W)`` (BCHW); unbatched ``(C, H, W)`` input is rejected with a
  ``ValueError`` rather than guessed at.
* ``rgb`` is float sRGB (gamma-encoded) in ``[0, 1]``.
* ``lab`` is CIELAB under the D65 white point and the 2 degree observer: ``L`` in ``[0, 100]`` and
  ``a``, ``b`` in Lab units (roughly ``[-128, 127]``; the sRGB gamut spans about ``[-86, 98]`` for
  ``a`` and ``[-108, 95]`` for ``b``).

The Lab conversion reproduces ``skimage.color.rgb2lab`` / ``lab2rgb`` (scikit-image 0.26) constant for
constant, which is also what the official DDColor ``tensor_lab2rgb`` implements. The conversions are
differentiable everywhere: every ``pow`` is fed a clamped base so that the branch ``torch.where``
discards can never produce a NaN gradient (e.g. at ``rgb == 0`` or on pure black / white).

Colorfulness is the Hasler & Suesstrunk (2003) metric in the absolute-value form that the official
DDColor and CT2 code use::

    rg = |R - G|,  yb = |0.5 (R + G) - B|
    CF = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "colorfulness",
    "colorfulness_loss",
    "colorfulness_np",
    "gray_rgb_from_l",
    "lab_to_rgb",
    "rgb_to_lab",
    "rgb_uint8_to_lab",
]

# --- sRGB transfer function (IEC 61966-2-1), thresholds as in skimage ---------------------------------
SRGB_DECODE_THRESHOLD = 0.04045  # gamma-encoded value below which sRGB is linear
SRGB_ENCODE_THRESHOLD = 0.0031308  # linear value below which sRGB is linear
SRGB_LINEAR_SLOPE = 12.92
SRGB_GAMMA = 2.4
SRGB_OFFSET = 0.055

# --- linear sRGB <-> CIE XYZ (skimage ``xyz_from_rgb``; the inverse is computed, as skimage does) -------
XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=np.float64,
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)

# --- CIE XYZ <-> CIELAB ----------------------------------------------------------------------------------
D65_WHITE = (0.95047, 1.0, 1.08883)  # reference white (X, Y, Z), D65 illuminant, 2 degree observer
LAB_EPSILON = 0.008856  # f(t) is a cube root above this, linear below (skimage's rounded 216/24389)
LAB_KAPPA_SLOPE = 7.787  # slope of the linear part of f(t) (skimage's rounded 841/108)
LAB_OFFSET = 16.0 / 116.0
LAB_INV_THRESHOLD = 0.2068966  # f^-1(t) threshold used by skimage (~ cbrt(LAB_EPSILON))

# --- colorfulness -----------------------------------------------------------------------------------------
CF_MEAN_WEIGHT = 0.3
COLORFULNESS_EPS = 1e-8  # added inside sqrt() by colorfulness_loss so its gradient exists at 0

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_bchw(x: torch.Tensor, channels: int, name: str) -> None:
    """Raise if ``x`` is not a floating ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{name} must have shape (B, {channels}, H, W) (batched, channels first), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {x.dtype}")


def _apply_matrix(matrix: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 color matrix to the channel axis of a (B, 3, H, W) tensor."""
    return torch.einsum("ij,bjhw->bihw", x.new_tensor(matrix), x)


def _srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    # Clamp the pow base to the branch's own domain: the discarded branch must stay finite, otherwise
    # its (zeroed) gradient becomes 0 * NaN = NaN for rgb <= 0.
    base = (rgb.clamp(min=SRGB_DECODE_THRESHOLD) + SRGB_OFFSET) / (1.0 + SRGB_OFFSET)
    return torch.where(rgb > SRGB_DECODE_THRESHOLD, base.pow(SRGB_GAMMA), rgb / SRGB_LINEAR_SLOPE)


def _linear_to_srgb(lin: torch.Tensor) -> torch.Tensor:
    power = lin.clamp(min=SRGB_ENCODE_THRESHOLD).pow(1.0 / SRGB_GAMMA)
    return torch.where(lin > SRGB_ENCODE_THRESHOLD, (1.0 + SRGB_OFFSET) * power - SRGB_OFFSET, lin * SRGB_LINEAR_SLOPE)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    cbrt = t.clamp(min=LAB_EPSILON).pow(1.0 / 3.0)
    return torch.where(t > LAB_EPSILON, cbrt, LAB_KAPPA_SLOPE * t + LAB_OFFSET)


def _lab_f_inv(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > LAB_INV_THRESHOLD, t.pow(3), (t - LAB_OFFSET) / LAB_KAPPA_SLOPE)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Convert sRGB to CIELAB (D65, 2 degree observer), matching ``skimage.color.rgb2lab``.

    Args:
        rgb: float tensor of shape (B, 3, H, W), gamma-encoded sRGB in [0, 1].

    Returns:
        Tensor of shape (B, 3, H, W) and the input's dtype: L in [0, 100], a and b in Lab units.

    Raises:
        ValueError: if ``rgb`` is not (B, 3, H, W).
        TypeError: if ``rgb`` is not a floating point tensor.
    """
    _check_bchw(rgb, 3, "rgb")
    dtype = rgb.dtype
    x = rgb.float() if dtype in _LOW_PRECISION else rgb
    return _linear_to_lab(_srgb_to_linear(x)).to(dtype)


def _linear_to_lab(lin: torch.Tensor) -> torch.Tensor:
    xyz = _apply_matrix(XYZ_FROM_RGB, lin)
    fx, fy, fz = (_lab_f(xyz[:, i : i + 1] / D65_WHITE[i]) for i in range(3))
    return torch.cat([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def rgb_uint8_to_lab(rgb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Convert 8-bit sRGB to CIELAB, fast: the sRGB decoding is a 256-entry table instead of a pow per pixel.

    Same function as ``rgb_to_lab(rgb / 255)``. In float32 it agrees within 1e-4, and the last bits depend on
    the CPU's SIMD code path (AVX2, AVX-512, ...). In float64 the error is about 1e-13 on every CPU, which is
    what byte-exact rounding needs (see ``ddcolor.data.shards.encode_lab``).

    Args:
        rgb: uint8 tensor of shape (B, 3, H, W).
        dtype: torch.float32 (default) or torch.float64, the precision of the whole computation.

    Returns:
        (B, 3, H, W) in ``dtype``: L in [0, 100], a and b in Lab units.
    """
    if rgb.dtype != torch.uint8:
        raise TypeError(f"rgb must be uint8, got {rgb.dtype}")
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must have shape (B, 3, H, W) (batched, channels first), got shape {tuple(rgb.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    table = _srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0).to(dtype)  # (256,) linear sRGB
    return _linear_to_lab(table[rgb.long()])


def lab_to_rgb(lab: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Convert CIELAB (D65, 2 degree observer) to sRGB, matching ``skimage.color.lab2rgb``.

    As in skimage, negative Z (from very large ``b``) is clipped to 0 before the XYZ -> RGB step.

    Args:
        lab: float tensor of shape (B, 3, H, W): L in [0, 100], a and b in Lab units.
        clamp: clamp the result to [0, 1], as skimage and the official DDColor ``tensor_lab2rgb`` do.
            With ``clamp=False`` out-of-gamut colors come back outside [0, 1].

    Returns:
        Tensor of shape (B, 3, H, W) and the input's dtype: gamma-encoded sRGB, in [0, 1] if ``clamp``.

    Raises:
        ValueError: if ``lab`` is not (B, 3, H, W).
        TypeError: if ``lab`` is not a floating point tensor.
    """
    _check_bchw(lab, 3, "lab")
    dtype = lab.dtype
    x = lab.float() if dtype in _LOW_PRECISION else lab

    lightness, a, b = x.unbind(dim=1)
    fy = (lightness + 16.0) / 116.0
    fx = fy + a / 500.0
    fz = (fy - b / 200.0).clamp(min=0.0)  # skimage clips negative Z
    xyz = torch.stack([_lab_f_inv(f) * w for f, w in zip((fx, fy, fz), D65_WHITE, strict=True)], dim=1)
    rgb = _linear_to_srgb(_apply_matrix(RGB_FROM_XYZ, xyz))
    if clamp:
        rgb = rgb.clamp(0.0, 1.0)
    return rgb.to(dtype)


def gray_rgb_from_l(l: torch.Tensor) -> torch.Tensor:  # noqa: E741 (L is the Lab name)
    """Build the DDColor network input from a lightness channel.

    The official pipeline keeps L, sets a = b = 0 and converts back to RGB; the result is a gray image
    whose three channels are equal up to float error (about 1e-4, because skimage's RGB -> XYZ matrix
    and its D65 white are rounded independently).

    Args:
        l: float tensor of shape (B, 1, H, W), L in [0, 100].

    Returns:
        Tensor of shape (B, 3, H, W), sRGB in [0, 1], same dtype as ``l``.

    Raises:
        ValueError: if ``l`` is not (B, 1, H, W).
        TypeError: if ``l`` is not a floating point tensor.
    """
    _check_bchw(l, 1, "l")
    zeros = torch.zeros_like(l)
    return lab_to_rgb(torch.cat([l, zeros, zeros], dim=1), clamp=True)


def _colorfulness(rgb: torch.Tensor, correction: int, eps: float) -> torch.Tensor:
    """Per-image colorfulness of a (B, 3, H, W) tensor; returns shape (B,)."""
    r, g, b = rgb.unbind(dim=1)
    rg = (r - g).abs().flatten(1)
    yb = (0.5 * (r + g) - b).abs().flatten(1)
    var = rg.var(dim=1, correction=correction) + yb.var(dim=1, correction=correction)
    mean_sq = rg.mean(dim=1).square() + yb.mean(dim=1).square()
    return torch.sqrt(var + eps) + CF_MEAN_WEIGHT * torch.sqrt(mean_sq + eps)


def colorfulness(rgb_255: torch.Tensor) -> torch.Tensor:
    """Hasler & Suesstrunk colorfulness metric per image, as the official DDColor evaluation computes it.

    Uses the population (biased) standard deviation, like ``np.std``. This is the evaluation metric; it
    is not meant for backpropagation (its sqrt has no gradient at 0), use :func:`colorfulness_loss`.

    Args:
        rgb_255: float tensor of shape (B, 3, H, W), RGB in [0, 255]. Integer tensors are converted to
            float64.

    Returns:
        Tensor of shape (B,): colorfulness of each image (0 for a gray image).

    Raises:
        ValueError: if ``rgb_255`` is not (B, 3, H, W).
    """
    if isinstance(rgb_255, torch.Tensor) and not rgb_255.is_floating_point():
        rgb_255 = rgb_255.double()
    _check_bchw(rgb_255, 3, "rgb_255")
    return _colorfulness(rgb_255, correction=0, eps=0.0)


def colorfulness_np(image: np.ndarray) -> float:
    """Colorfulness of one uint8 ``(H, W, 3)`` RGB image, exactly as the official DDColor metric code.

    The image is cast to float64 (values stay in 0..255) and the population std is used.

    Args:
        image: array of shape (H, W, 3), RGB channel order, normally uint8 in [0, 255].

    Returns:
        The colorfulness as a Python float (0 for a gray image).

    Raises:
        ValueError: if ``image`` is not (H, W, 3).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3) (RGB, channels last), got shape {image.shape}")
    r, g, b = (image[..., i].astype(np.float64) for i in range(3))
    rg = np.abs(r - g)
    yb = np.abs(0.5 * (r + g) - b)
    std_root = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    mean_root = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(std_root + CF_MEAN_WEIGHT * mean_root)


def colorfulness_loss(rgb_01: torch.Tensor, reduction: str = "mean", eps: float = COLORFULNESS_EPS) -> torch.Tensor:
    """Differentiable colorfulness loss ``1 - CF`` used to train DDColor.

    As the official ``ColorfulnessLoss``, CF is computed on RGB in [0, 1] (so it is about CF_255 / 255)
    with torch's unbiased (N - 1) standard deviation. ``eps`` is added inside both square roots so the
    gradient is finite at CF = 0 (a gray image); it raises CF by at most ``1.3 * sqrt(eps)`` (1.3e-4 by
    default), negligible against CF values of typical images (~0.1-0.5).

    Args:
        rgb_01: float tensor of shape (B, 3, H, W), sRGB in [0, 1]; needs H * W >= 2.
        reduction: ``"mean"`` (default) averages ``1 - CF`` over the batch so the loss scale does not
            depend on the batch size; ``"sum"`` sums it, as the official code does (use it to reproduce
            official loss weights); ``"none"`` returns the per-image losses, shape (B,).
        eps: small constant inside the square roots.

    Returns:
        A scalar tensor, or shape (B,) for ``reduction="none"``.

    Raises:
        ValueError: if ``rgb_01`` is not (B, 3, H, W), has fewer than 2 pixels, or ``reduction`` is
            unknown.
        TypeError: if ``rgb_01`` is not a floating point tensor.
    """
    _check_bchw(rgb_01, 3, "rgb_01")
    if rgb_01.shape[2] * rgb_01.shape[3] < 2:
        raise ValueError(f"colorfulness_loss needs at least 2 pixels per image, got {tuple(rgb_01.shape)}")
    loss = 1.0 - _colorfulness(rgb_01, correction=1, eps=eps)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
