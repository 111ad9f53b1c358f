"""Synthetic video clips with ground truth: camera moves over real color photos, and hard cuts between photos.

Each frame t is the photo sampled through an affine camera ``A_t`` (frame pixel (x, y, 1) -> photo pixel), so the
true colors and the true motion are known exactly:

    flow t -> t-1 at x  =  A_{t-1}^-1 A_t x - x          (where frame t's pixel x is in frame t-1)
    mask                =  that point lies inside frame t-1 (nothing else occludes in a flat scene)

Moves: "pan" (translation), "zoom" (scale about the centre), "rotate" (rotation about the centre), "still". The
camera stays inside the photo, so every frame pixel shows the photo. `cut_clip` joins two such clips: the flow
across the cut is undefined (mask 0).

Public API:
    skimage_photo(name) -> uint8 (H, W, 3);  SKIMAGE_PHOTOS
    render_clip(photo, move, frames, size) -> SyntheticClip (frames uint8 (T, h, w, 3), flows, masks)
    cut_clip(first, second) -> SyntheticClip  (with ``cut_at``)
    write_gray_video(path, frames, fps) -> Path   (the luma only, H.264, as an old film would come)
    ab_of(frames) -> float32 (T, 2, h, w) Lab a*, b*
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ddcolor._optional import require
from ddcolor.color import rgb_to_lab

cv2 = require("cv2", "video", "synthetic video clips")

__all__ = ["MOVES", "SKIMAGE_PHOTOS", "SyntheticClip", "ab_of", "cut_clip", "render_clip", "skimage_photo"]

MOVES = ("pan", "zoom", "rotate", "still")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def skimage_photo(name: str) -> np.ndarray:
    """A color photo shipped with scikit-image (no download), uint8 (H, W, 3)."""
    data = require("skimage.data", "train", "the scikit-image sample photos")
    if name not in SKIMAGE_PHOTOS:
        raise ValueError(f"photo must be one of {SKIMAGE_PHOTOS}, got {name!r}")
    return np.ascontiguousarray(getattr(data, name)()[..., :3])


@dataclass
class SyntheticClip:
    """Frames uint8 (T, h, w, 3) RGB; ``flows[i]`` float32 (h, w, 2) and ``masks[i]`` float32 (h, w) for the pair
    (i, i+1): flow from frame i+1 to frame i; ``cut_at``: index of the first frame after a cut (None: no cut)."""

    frames: np.ndarray
    flows: list[np.ndarray]
    masks: list[np.ndarray]
    cut_at: int | None = None


def _camera(move: str, t: float, photo_hw: tuple[int, int], size: tuple[int, int], amount: float) -> np.ndarray:
    """3x3 matrix frame pixel -> photo pixel at time t in [0, 1]."""
    (ph, pw), (h, w) = photo_hw, size
    base_scale = 0.8 * min(ph / h, pw / w)  # frame covers 80% of the photo's short side
    cx, cy, scale, angle = pw / 2, ph / 2, base_scale, 0.0
    if move == "pan":
        cx += (t - 0.5) * amount * (pw - base_scale * w)
    elif move == "zoom":
        scale = base_scale * (1.0 - 0.35 * amount * t)
    elif move == "rotate":
        angle = np.deg2rad(12.0 * amount * (t - 0.5))
        scale = base_scale * 0.8  # room for the corners
    elif move != "still":
        raise ValueError(f"move must be one of {MOVES}, got {move!r}")
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    to_centre = np.array([[1, 0, -(w - 1) / 2], [0, 1, -(h - 1) / 2], [0, 0, 1]])
    rot_scale = np.array([[c, -s, cx - 0.5], [s, c, cy - 0.5], [0, 0, 1]])
    return rot_scale @ to_centre


def render_clip(
    photo: np.ndarray, move: str = "pan", frames: int = 24, size: tuple[int, int] = (192, 256), amount: float = 1.0
) -> SyntheticClip:
    """Render a camera move over ``photo``.

    Args:
        photo: uint8 (H, W, 3) RGB.
        move: one of `MOVES`.
        frames: T.
        size: (h, w) of the frames, px.
        amount: strength of the move (1 = pan across the free width / zoom in 35% / rotate 12 degrees).
    """
    h, w = size
    cams = [_camera(move, i / max(frames - 1, 1), photo.shape[:2], size, amount) for i in range(frames)]
    # INTER_AREA-like quality: pre-blur the photo by the downscale factor before bilinear sampling
    scale = abs(np.linalg.det(cams[0][:2, :2])) ** 0.5
    src = cv2.GaussianBlur(photo, (0, 0), 0.5 * scale) if scale > 1.5 else photo
    rendered = [
        cv2.warpAffine(
            src, cam[:2], (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
        )
        for cam in cams
    ]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    grid = np.stack([gx, gy, np.ones_like(gx)], axis=-1)  # (h, w, 3)
    flows, masks = [], []
    for prev, cur in itertools.pairwise(cams):
        back = grid @ (np.linalg.inv(prev) @ cur).T
        flow = (back[..., :2] - grid[..., :2]).astype(np.float32)
        inside = (back[..., 0] >= 0) & (back[..., 0] <= w - 1) & (back[..., 1] >= 0) & (back[..., 1] <= h - 1)
        flows.append(flow)
        masks.append(inside.astype(np.float32))
    return SyntheticClip(np.stack(rendered), flows, masks)


def cut_clip(first: SyntheticClip, second: SyntheticClip) -> SyntheticClip:
    """``first`` then ``second`` (same frame size) with a hard cut; the pair across the cut has an empty mask."""
    if first.frames.shape[1:] != second.frames.shape[1:]:
        raise ValueError(f"clips differ in frame size: {first.frames.shape[1:]} vs {second.frames.shape[1:]}")
    h, w = first.frames.shape[1:3]
    zero_flow, zero_mask = np.zeros((h, w, 2), np.float32), np.zeros((h, w), np.float32)
    return SyntheticClip(
        np.concatenate([first.frames, second.frames]),
        [*first.flows, zero_flow, *second.flows],
        [*first.masks, zero_mask, *second.masks],
        cut_at=len(first.frames),
    )


def ab_of(frames: np.ndarray) -> np.ndarray:
    """Lab a*, b* (float32 (T, 2, h, w)) of uint8 (T, h, w, 3) or float [0, 1] RGB frames."""
    x = torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float()
    if np.asarray(frames).dtype == np.uint8:
        x = x / 255.0
    return torch.cat([rgb_to_lab(x[i : i + 8])[:, 1:] for i in range(0, len(x), 8)]).numpy()


def write_gray_video(
    path: str | os.PathLike[str], frames: np.ndarray, fps: int = 24, crf: int = 0, audio: bool = False
) -> Path:
    """Write the luma of RGB ``frames`` (uint8 (T, h, w, 3)) as gray H.264 (U = V = 128), CFR ``fps``.

    Args:
        crf: 0 = lossless (the default here, so ground truth stays exact).
        audio: add a mono AAC tone track (8 kHz) covering the clip.
    """
    av = require("av", "video", "writing video")
    path = Path(path)
    tb = Fraction(1, fps * 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.time_base = "yuv420p", tb
        stream.codec_context.time_base = tb
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        sound = container.add_stream("aac", rate=8000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for i, rgb in enumerate(frames):
            yuv = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            planes = yuv.to_ndarray()
            planes[rgb.shape[0] :] = 128  # drop the chroma: a gray film
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts, frame.time_base = i * 1000, tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if sound is not None:
            samples = int(8000 * len(frames) / fps)
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 8000)).astype(np.float32)
            for start in range(0, samples, 1024):
                chunk = tone[None, start : start + 1024]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 8000, start
                for packet in sound.encode(frame):
                    container.mux(packet)
            for packet in sound.encode(None):
                container.mux(packet)
    return path
