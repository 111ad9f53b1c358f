"""Temporal stabilisation of predicted chrominance: flow-guided propagation with an occlusion-aware blend.

A per-frame colorizer flickers: the same object gets different colors in neighbouring frames. Without a trained
video network, this module makes the color of frame t follow the (already stabilised) color of frame t-1 where the
motion is reliable:

    gray t-1, gray t --DIS optical flow (both directions)--> flow t->t-1, flow t-1->t
    confidence c(x) = forward-backward consistent (Sundaram et al. 2010, as used by Lai et al. 2018)
                      x inside frame t-1 after the move x exp(-(|gray t - warped gray t-1| / sigma)^2)
    ab_out t = w * warp(ab_out t-1, flow t->t-1) + (1 - w) * ab_pred t,   w = strength * c

which is a motion-compensated running average per pixel (steady-state noise variance (1-s)/(1+s) of per-frame for a
static scene at strength s). Occluded and newly visible pixels take the current prediction. At a scene cut, detected
on the gray frames (histogram distance, or almost no reliable flow), the state is reset, so colors never bleed from
one shot into the next. Only ab (Lab units) is touched: the lightness stays the input's.

Everything works on a small grid: the network's S x S input (aspect squeezed as for the network); the flows are
computed at most 256 px wide (``flow_size``) and upsampled, so the cost per frame is two DIS flows at <= 256 x 256
plus a few remaps at S x S, whatever the video resolution.

Public API:
    TemporalStabilizer(strength=0.8, cut_threshold=0.5) -> call (gray uint8 (h, w), ab float32 (2, h, w)) -> ab
    optical_flow(src, dst) -> float32 (h, w, 2);  warp(image, flow) -> image;  flow_confidence(fw, bw) -> (h, w)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddcolor._optional import require

cv2 = require("cv2", "video", "optical flow for video colorization")

__all__ = [
    "StabilizerStats",
    "TemporalStabilizer",
    "flow_confidence",
    "gray_histogram_distance",
    "optical_flow",
    "warp",
]


def _dis() -> Any:  # one per stabiliser: DIS objects keep state and are not shared
    # MEDIUM: finer than FAST on small grids for ~2x the cost; still a few ms at 256 x 256 on one core.
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)


def optical_flow(src: np.ndarray, dst: np.ndarray, dis: Any = None) -> np.ndarray:
    """Dense flow from ``src`` to ``dst`` (uint8 gray (h, w)): ``src[y, x] ~ dst[y + f[..., 1], x + f[..., 0]]``.

    Returns float32 (h, w, 2) in pixels (x, y). OpenCV's DIS (Kroeger et al. 2016): no weights needed.
    """
    return (dis or _dis()).calc(src, dst, None)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates x, y (float32 (h, w) each), cached per size (read-only)."""
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    gx.flags.writeable = gy.flags.writeable = False
    return gx, gy


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Sample ``image`` (h, w) or (h, w, C) at ``x + flow(x)`` (bilinear, edges replicated): brings the frame the
    flow points into onto the grid the flow was computed on."""
    gx, gy = _grid(*flow.shape[:2])
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def flow_confidence(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Occlusion mask from forward-backward consistency (Sundaram et al. 2010; the mask of Lai et al. 2018).

    Args:
        forward: flow t -> t-1 on the grid of frame t, float32 (h, w, 2).
        backward: flow t-1 -> t on the grid of frame t-1.

    Returns:
        float32 (h, w) in {0, 1}: 1 where following ``forward`` then ``backward`` returns to the start
        (``|f + b|^2 <= 0.01 (|f|^2 + |b|^2) + 0.5``) and the target lies inside frame t-1.
    """
    h, w = forward.shape[:2]
    back = warp(backward, forward)
    err = np.sum((forward + back) ** 2, axis=2)
    bound = 0.01 * (np.sum(forward**2, axis=2) + np.sum(back**2, axis=2)) + 0.5
    gx, gy = _grid(h, w)
    tx, ty = gx + forward[..., 0], gy + forward[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return ((err <= bound) & inside).astype(np.float32)


def gray_histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = 32) -> float:
    """Half the L1 distance of the normalised gray histograms of two uint8 frames: 0 (same) .. 1 (disjoint)."""
    ha = np.bincount(a.ravel() // (256 // bins), minlength=bins) / a.size
    hb = np.bincount(b.ravel() // (256 // bins), minlength=bins) / b.size
    return float(0.5 * np.abs(ha - hb).sum())


@dataclass
class StabilizerStats:
    """What the last call did: ``cut`` (state reset at this frame), ``confidence`` (mean of c over the frame,
    0 after a reset), ``histogram_distance`` (gray histogram distance to the previous frame)."""

    cut: bool = True
    confidence: float = 0.0
    histogram_distance: float = 0.0


class TemporalStabilizer:
    """Stateful ab stabiliser; feed frames in presentation order (see the module docstring for the method).

    Args:
        strength: s in [0, 1], the weight of the propagated color where the flow is reliable; 0 = per-frame.
        cut_threshold: gray-histogram distance (0..1) above which a frame starts a new shot.
        min_confidence: a frame whose reliable-flow fraction is below this also starts a new shot (a cut between
            two shots with similar histograms, or a whip pan).
        sigma: photometric tolerance, gray levels (0..255), of the confidence term.
        flow_size: the flow is computed on frames shrunk to at most this many px on the long side, then upsampled
            (the cost of DIS grows with the area; color moves smoothly); None = on the full grid.
    """

    def __init__(
        self,
        strength: float = 0.8,
        cut_threshold: float = 0.5,
        min_confidence: float = 0.1,
        sigma: float = 12.0,
        flow_size: int | None = 256,
    ) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"temporal strength must be in [0, 1], got {strength}")
        self.strength = strength
        self.cut_threshold = cut_threshold
        self.min_confidence = min_confidence
        self.sigma = sigma
        self.flow_size = flow_size
        self.stats = StabilizerStats()
        self._dis = _dis()
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame: the next frame is taken as predicted."""
        self._gray: np.ndarray | None = None
        self._ab: np.ndarray | None = None

    def state(self) -> dict[str, np.ndarray]:
        """The previous gray frame and stabilised ab, for resuming a run (empty after a reset)."""
        return {} if self._gray is None else {"gray": self._gray.copy(), "ab": self._ab.copy()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state` returned."""
        if "gray" in state:
            self._gray, self._ab = np.asarray(state["gray"], np.uint8), np.asarray(state["ab"], np.float32)
        else:
            self.reset()

    def _flows(self, cur: np.ndarray, prev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flows cur -> prev and prev -> cur on the (h, w) grid, computed at most ``flow_size`` px wide."""
        h, w = cur.shape
        scale = self.flow_size / max(h, w) if self.flow_size else 1.0
        if scale >= 1.0:
            return optical_flow(cur, prev, self._dis), optical_flow(prev, cur, self._dis)
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        small_cur = cv2.resize(cur, size, interpolation=cv2.INTER_AREA)
        small_prev = cv2.resize(prev, size, interpolation=cv2.INTER_AREA)

        def up(flow: np.ndarray) -> np.ndarray:
            flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR)
            flow[..., 0] *= w / size[0]
            flow[..., 1] *= h / size[1]
            return flow

        return up(optical_flow(small_cur, small_prev, self._dis)), up(optical_flow(small_prev, small_cur, self._dis))

    def __call__(self, gray: np.ndarray, ab: np.ndarray) -> np.ndarray:
        """Stabilise one frame.

        Args:
            gray: uint8 (h, w) lightness of the frame (any monotonic gray; the flow and cut detection use it).
            ab: float32 (2, h, w) predicted a*, b* (Lab units) on the same grid.

        Returns:
            float32 (2, h, w) stabilised a*, b*.
        """
        gray = np.ascontiguousarray(gray, dtype=np.uint8)
        ab = np.asarray(ab, dtype=np.float32)
        if gray.shape != ab.shape[1:]:
            raise ValueError(f"gray {gray.shape} and ab {ab.shape} must share the (h, w) grid")
        out = ab
        if self._gray is not None and self._gray.shape == gray.shape and self.strength > 0:
            dist = gray_histogram_distance(self._gray, gray)
            self.stats = StabilizerStats(cut=True, confidence=0.0, histogram_distance=dist)
            if dist <= self.cut_threshold:
                forward, backward = self._flows(gray, self._gray)  # t -> t-1, t-1 -> t
                conf = flow_confidence(forward, backward)
                if conf.mean() >= self.min_confidence:
                    resid = gray.astype(np.float32) - warp(self._gray, forward).astype(np.float32)
                    conf *= np.exp(-((resid / self.sigma) ** 2))
                    warped = warp(np.ascontiguousarray(self._ab.transpose(1, 2, 0)), forward).transpose(2, 0, 1)
                    weight = self.strength * conf
                    out = (weight * warped + (1.0 - weight) * ab).astype(np.float32)
                    self.stats = StabilizerStats(cut=False, confidence=float(conf.mean()), histogram_distance=dist)
        else:  # first frame, a size change, or strength 0 (plain per-frame)
            self.stats = StabilizerStats(cut=self._gray is None or self._gray.shape != gray.shape)
        self._gray, self._ab = gray, out
        return out
