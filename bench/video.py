"""Video colorization benchmark: temporal consistency, cut handling and throughput (issue #15).

Three parts, all on synthetic clips with ground truth (`ddcolor.video_synth`: camera moves over scikit-image photos,
clips with a hard cut), so the true colors and the true motion are known:

1. Stabiliser on a FLICKERING per-frame "model" (meaningful): the ground-truth ab plus per-frame tint, saturation
   and smooth-field jitter. Per-frame (``--temporal off``) vs stabilised: warp error over non-occluded pixels
   (true flow and mask), CDC, PSNR and colorfulness against the ground truth. Target: warp error <= 0.5x at equal
   or better PSNR.
2. Cuts: two shots joined by a hard cut, the flickering model: where the stabiliser resets, and how far the frames
   after the cut are from per-frame output (|Δab|, Lab units). Target: the first frame after the cut equals
   per-frame output (no bleeding).
3. A random-init DDColor network (no pretrained weights here) through the full file pipeline (decode -> network
   -> stabilise -> encode): fps per preset and input size, stabilised vs per-frame (target within 1.5x), and the
   warp error / PSNR of its output — NOT a fair flicker test (a random network's colors do not mean anything).

    python bench/video.py --frames 24 --presets atto,tiny --sizes 256,512 --out bench_video.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import av
import cv2
import torch
from procstats import cpu_name

from ddcolor.metrics import color_distribution_consistency, video_psnr_colorfulness, video_warp_error
from ddcolor.video import VideoColorizer
from ddcolor.video_synth import ab_of, cut_clip, render_clip, skimage_photo, write_gray_video

FRAME_SIZE = (192, 256)  # (h, w) of the synthetic clips


def flicker_predictor(gt_frames: np.ndarray, size: int, sigma: float = 6.0, gain: float = 0.15, seed: int = 0):
    """Per-frame "model" = true ab (at S x S) x (1 + N(0, gain)) + N(0, sigma) tint + smooth N(0, sigma) field."""
    rng = np.random.default_rng(seed)
    gt = ab_of(np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in gt_frames]))
    count = iter(range(len(gt)))

    def predict(rgbs):
        out = []
        for _ in rgbs:
            i = next(count)
            field = cv2.resize(rng.normal(0, sigma, (4, 4, 2)).astype(np.float32), (size, size), cv2.INTER_CUBIC)
            out.append(gt[i] * (1 + rng.normal(0, gain)) + rng.normal(0, sigma, (2, 1, 1)) + field.transpose(2, 0, 1))
        return np.stack(out).astype(np.float32)

    return predict


def quality(out: np.ndarray, clip) -> dict[str, float]:
    """Warp error (true flow, non-occluded), CDC, PSNR / colorfulness vs ground truth of uint8 frames."""
    ab = list(ab_of(out))
    return {
        "warp_error": video_warp_error(ab, clip.flows, clip.masks),
        "cdc": color_distribution_consistency(ab),
        **video_psnr_colorfulness(list(out), list(clip.frames)),
    }


def run_frames(video: VideoColorizer, clip) -> tuple[np.ndarray, list[int]]:
    outs = list(video.colorize_frames(clip.frames))
    return np.stack([o for o, _ in outs]), [i for i, (_, cut) in enumerate(outs) if cut and i]


def part_flicker(frames: int, size: int, strength: float) -> list[dict]:
    rows = []
    for photo in ("astronaut", "coffee", "chelsea", "rocket"):
        for move in ("pan", "zoom", "rotate"):
            clip = render_clip(skimage_photo(photo), move, frames, FRAME_SIZE)
            row = {
                "photo": photo,
                "move": move,
                "gt_warp_error": video_warp_error(list(ab_of(clip.frames)), clip.flows, clip.masks),
            }
            for mode in ("off", "flow"):
                video = VideoColorizer(
                    predictor=flicker_predictor(clip.frames, size),
                    size=size,
                    temporal=mode,
                    strength=strength,
                    batch_size=4,
                )
                out, _ = run_frames(video, clip)
                row[mode] = quality(out, clip)
            row["warp_ratio"] = row["flow"]["warp_error"] / row["off"]["warp_error"]
            rows.append(row)
            print(
                f"  {photo:10s} {move:6s} warp error {row['off']['warp_error']:7.2f} -> "
                f"{row['flow']['warp_error']:6.2f} "
                f"({row['warp_ratio']:.2f}x)  PSNR {row['off']['psnr']:.2f} -> {row['flow']['psnr']:.2f} dB  "
                f"CDC {row['off']['cdc']:.3f} -> {row['flow']['cdc']:.3f}",
                flush=True,
            )
    return rows


def part_control(frames: int, size: int, strength: float) -> list[dict]:
    """A per-frame "model" with NO flicker (the true ab): stabilising must not cost accuracy (warp blur, lag)."""
    rows = []
    for move in ("pan", "zoom", "rotate"):
        clip = render_clip(skimage_photo("coffee"), move, frames, FRAME_SIZE)
        row = {"photo": "coffee", "move": move}
        for mode in ("off", "flow"):
            predict = flicker_predictor(clip.frames, size, sigma=0.0, gain=0.0)
            out, _ = run_frames(VideoColorizer(predictor=predict, size=size, temporal=mode, strength=strength), clip)
            row[mode] = quality(out, clip)
        rows.append(row)
        print(
            f"  coffee {move:6s} (no flicker) PSNR {row['off']['psnr']:.2f} -> {row['flow']['psnr']:.2f} dB, "
            f"warp error "
            f"{row['off']['warp_error']:.2f} -> {row['flow']['warp_error']:.2f}",
            flush=True,
        )
    return rows


def part_cost(sizes: list[int], frames: int = 20) -> list[dict]:
    """Wall time of the stabiliser alone per frame (two DIS flows, mask, warp, blend) on the S x S grid."""
    from ddcolor.temporal import TemporalStabilizer

    rows = []
    clip = render_clip(skimage_photo("coffee"), "pan", frames, FRAME_SIZE)
    for size in sizes:
        grays = [
            cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA)
            for f in clip.frames
        ]
        ab = np.zeros((2, size, size), np.float32)
        stabilizer = TemporalStabilizer(0.8)
        stabilizer(grays[0], ab)
        t = time.perf_counter()
        for gray in grays[1:]:
            stabilizer(gray, ab)
        ms = 1000 * (time.perf_counter() - t) / (frames - 1)
        rows.append({"size": size, "ms_per_frame": ms})
        print(f"  stabiliser alone at {size} x {size}: {ms:.1f} ms/frame", flush=True)
    return rows


def part_cuts(frames: int, size: int, strength: float) -> list[dict]:
    rows = []
    pairs = [("astronaut", "coffee"), ("chelsea", "rocket"), ("coffee", "chelsea")]
    for a, b in pairs:
        clip = cut_clip(
            render_clip(skimage_photo(a), "pan", frames // 2, FRAME_SIZE),
            render_clip(skimage_photo(b), "zoom", frames - frames // 2, FRAME_SIZE),
        )
        per_frame, _ = run_frames(
            VideoColorizer(predictor=flicker_predictor(clip.frames, size), size=size, temporal="off"), clip
        )
        video = VideoColorizer(predictor=flicker_predictor(clip.frames, size), size=size, strength=strength)
        stable, cuts = run_frames(video, clip)
        diff = np.abs(ab_of(stable[clip.cut_at :]) - ab_of(per_frame[clip.cut_at :])).mean(axis=(1, 2, 3))
        gt = ab_of(clip.frames[clip.cut_at :])
        err_stable = np.abs(ab_of(stable[clip.cut_at :]) - gt).mean(axis=(1, 2, 3))
        err_per_frame = np.abs(ab_of(per_frame[clip.cut_at :]) - gt).mean(axis=(1, 2, 3))
        row = {
            "clip": f"{a} | {b}",
            "cut_at": clip.cut_at,
            "resets": cuts,
            "first_after_cut_max_dab": float(
                np.abs(
                    ab_of(stable[clip.cut_at : clip.cut_at + 1]) - ab_of(per_frame[clip.cut_at : clip.cut_at + 1])
                ).max()
            ),
            "after_cut_mean_dab_vs_per_frame": [round(float(d), 3) for d in diff[:4]],
            "after_cut_mean_dab_vs_gt": {
                "flow": [round(float(d), 2) for d in err_stable[:4]],
                "off": [round(float(d), 2) for d in err_per_frame[:4]],
            },
        }
        rows.append(row)
        print(
            f"  {row['clip']:20s} cut at {clip.cut_at}, resets at {cuts}; first frame after: max |Δab| vs per-frame "
            f"{row['first_after_cut_max_dab']:.3f}; next frames mean |Δab| vs per-frame "
            f"{row['after_cut_mean_dab_vs_per_frame']}",
            flush=True,
        )
    return rows


def part_network(frames: int, presets: list[str], sizes: list[int], strength: float, precision: str) -> list[dict]:
    from ddcolor.colorize import Colorizer, random_init_model

    clip = render_clip(skimage_photo("coffee"), "pan", frames, FRAME_SIZE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = write_gray_video(Path(tmp) / "gray.mp4", clip.frames, fps=24, crf=0, audio=True)
        for preset in presets:
            net = random_init_model(preset, warn=False)
            for size in sizes:
                colorizer = Colorizer(net, input_size=size, device="cpu", precision=precision)
                colorizer.colorize_float([clip.frames[0].astype(np.float32) / 255])  # warm-up
                t = time.perf_counter()
                colorizer.colorize_float([f.astype(np.float32) / 255 for f in clip.frames])
                images_fps = frames / (time.perf_counter() - t)
                row = {"preset": preset, "size": size, "precision": colorizer.precision, "images_fps": images_fps}
                for mode in ("off", "flow"):
                    video = VideoColorizer(colorizer, temporal=mode, strength=strength, crf=18)
                    result = video.colorize_video(src, Path(tmp) / f"{preset}{size}{mode}.mp4", overwrite=True)
                    with av.open(str(Path(tmp) / f"{preset}{size}{mode}.mp4")) as c:
                        out = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
                    row[mode] = {"fps": result.fps, "seconds": result.seconds, **quality(out, clip)}
                row["slowdown"] = row["off"]["fps"] / row["flow"]["fps"]
                rows.append(row)
                print(
                    f"  {preset:5s} {size}: images {images_fps:5.2f} fps; video per-frame "
                    f"{row['off']['fps']:5.2f} fps, "
                    f"stabilised {row['flow']['fps']:5.2f} fps ({row['slowdown']:.2f}x); random-net warp error "
                    f"{row['off']['warp_error']:.2f} -> {row['flow']['warp_error']:.2f}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--size", type=int, default=256, help="stabiliser grid S for parts 1-2 (network input size)")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--presets", default="atto,tiny")
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--net-frames", type=int, default=16, help="frames for part 3 (the network is slow on CPU)")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--parts", default="flicker,control,cost,cuts,network")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    report = {
        "machine": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "frame_size": FRAME_SIZE,
        "frames": args.frames,
        "strength": args.strength,
        "av": av.__version__,
        "ffmpeg": getattr(av, "ffmpeg_version_info", "?"),
    }
    print(f"machine: {report['machine']}, torch threads {report['torch_threads']}", flush=True)
    if "flicker" in parts:
        print("1. flickering per-frame model (ground truth + per-frame jitter), per-frame -> stabilised:", flush=True)
        rows = part_flicker(args.frames, args.size, args.strength)
        report["flicker"] = rows
        report["flicker_summary"] = {
            "mean_warp_ratio": float(np.mean([r["warp_ratio"] for r in rows])),
            "max_warp_ratio": float(np.max([r["warp_ratio"] for r in rows])),
            "mean_psnr_off": float(np.mean([r["off"]["psnr"] for r in rows])),
            "mean_psnr_flow": float(np.mean([r["flow"]["psnr"] for r in rows])),
            "min_psnr_gain": float(np.min([r["flow"]["psnr"] - r["off"]["psnr"] for r in rows])),
        }
        print(f"  summary: {report['flicker_summary']}", flush=True)
    if "control" in parts:
        print("1b. control: per-frame model without flicker (the true ab):", flush=True)
        report["control"] = part_control(args.frames, args.size, args.strength)
    if "cost" in parts:
        print("stabiliser cost:", flush=True)
        report["cost"] = part_cost([int(x) for x in args.sizes.split(",")])
    if "cuts" in parts:
        print("2. hard cuts (flickering model):", flush=True)
        report["cuts"] = part_cuts(args.frames, args.size, args.strength)
    if "network" in parts:
        print(
            f"3. random-init network, full file pipeline ({args.net_frames} frames {FRAME_SIZE[1]}x{FRAME_SIZE[0]}):",
            flush=True,
        )
        report["network"] = part_network(
            args.net_frames,
            args.presets.split(","),
            [int(s) for s in args.sizes.split(",")],
            args.strength,
            args.precision,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
