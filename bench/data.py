"""Data-plane benchmark: the shard loader vs the official per-sample recipe, shard size, ingestion cost.

Usage::

    .venv/bin/python bench/data.py [--images 200] [--size 256] [--batch 16] [--workers 0 2] [--keep DIR]
    .venv/bin/python bench/data.py --only ingest --repeats 5     # the ingestion rows only (about a minute)

What it does, in one run:

1. Writes ``--images`` JPEGs (500x375, quality 90) made from scikit-image sample photos with random crops, flips
   and color jitter.
2. Ingests them into Lab shards with `ddcolor.data.ingest` (one process, best of ``--repeats`` runs into fresh
   folders, so the first run's imports and page faults do not count) and times it against JPEG decode + bilinear
   resize alone (PIL, one process, best of as many passes): CPU time per image (`time.process_time`: the machine is
   shared, and CPU time is what "per core" means), the wall time, and the ratio (target: within 2x). Then the
   stages of one shard job (`ddcolor.data.ingest_jobs.write_shard`) timed one by one with the library's own
   functions: read + sha256, decode, resize, Lab, colorfulness, Parquet, the shard's sha256.
3. Times one epoch of each training input path, through a DataLoader (batch ``--batch``) with 0 and 2 workers:
   - ``official``: the official DDColor recipe per sample: read the JPEG from disk, resize to ``--size`` (PIL
     bilinear, as cv2.resize's default INTER_LINEAR), ``skimage.color.rgb2lab``, gray RGB via
     ``skimage.color.lab2rgb`` of (L, 0, 0), to tensors;
   - ``shards``: `ddcolor.data.loader` (`build_dataloader`, training split: shuffle + flip).
   Target: shards >= 5x official.
4. Prints bytes per image in the shards vs the JPEGs, and the images/s a GPU training at ``--size`` needs (an
   estimate from counted FLOPs and an assumed sustained throughput, stated in the output: there is no GPU here).

Numbers on a shared 2-core machine are noisy; the ratios are the point.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from procstats import machine
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddcolor.config import DataConfig  # noqa: E402
from ddcolor.data.loader import build_dataloader  # noqa: E402

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "cat")
JPEG_SIZE = (500, 375)


# --- inputs --------------------------------------------------------------------------------------------------


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct 500x375 JPEGs: random crops / flips / color jitter of scikit-image sample photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in SAMPLES]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = photo[top : top + ch, left : left + cw].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = crop * rng.uniform(0.8, 1.2, size=3) + rng.uniform(-20, 20)  # per-channel gain, brightness
        im = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(JPEG_SIZE, Image.Resampling.BILINEAR)
        path = folder / f"img_{i:05d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


# --- the official per-sample path ----------------------------------------------------------------------------


class OfficialRecipe(Dataset):
    """Per-sample preprocessing as in the official DDColor LabDataset (skimage for the color conversions)."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from skimage import color

        with Image.open(self.paths[index]) as im:
            rgb = np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR))
        lab = color.rgb2lab(rgb.astype(np.float32) / 255.0)
        lightness = lab[:, :, :1]
        gray_lab = np.concatenate([lightness, np.zeros_like(lightness), np.zeros_like(lightness)], axis=-1)
        gray_rgb = color.lab2rgb(gray_lab)
        return {
            "gray_rgb": torch.from_numpy(np.ascontiguousarray(gray_rgb.transpose(2, 0, 1), dtype=np.float32)),
            "l": torch.from_numpy(np.ascontiguousarray(lightness.transpose(2, 0, 1), dtype=np.float32)),
            "ab": torch.from_numpy(np.ascontiguousarray(lab[:, :, 1:].transpose(2, 0, 1), dtype=np.float32)),
        }


def time_epoch(loader) -> tuple[float, float]:
    """(images/s over the full epoch, worker start-up included; images/s after the first batch)."""
    start, n, first, n_first = time.perf_counter(), 0, None, 0
    for batch in loader:
        n += batch["l"].shape[0]
        if first is None:
            first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    steady = (n - n_first) / (end - first) if first is not None and end > first else float("nan")
    return n / (end - start), steady


def best_rates(loader, repeats: int) -> tuple[float, float]:
    """Best (full-epoch, steady) images/s over ``repeats`` epochs of one loader (built once, as a trainer does)."""
    rates = []
    for epoch in range(repeats):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        rates.append(time_epoch(loader))
    return max(r[0] for r in rates), max(r[1] for r in rates)


# --- ingestion -----------------------------------------------------------------------------------------------


def decode_resize_seconds(paths: list[Path], size: int) -> tuple[float, float]:
    """(CPU s, wall s) per image of JPEG decode + bilinear resize alone (the reference of the ingestion ratio)."""
    cpu, wall = time.process_time(), time.perf_counter()
    for path in paths:
        with Image.open(path) as im:
            im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return (time.process_time() - cpu) / len(paths), (time.perf_counter() - wall) / len(paths)


def ingest_seconds(raw: Path, dest: Path, cfg: DataConfig) -> tuple[float, float, int]:
    """(CPU s, wall s) per image of one `ddcolor.data.ingest` run of ``raw`` into a fresh ``dest``; rows written."""
    from ddcolor.data.ingest import ingest

    shutil.rmtree(dest, ignore_errors=True)
    cpu, wall = time.process_time(), time.perf_counter()
    report = ingest(raw, dest, cfg, num_workers=0)
    n = max(report.ingested, 1)
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n, report.ingested


STAGES = ("read + sha256", "decode (8-bit)", "resize (bicubic, antialiased)", "Lab (table)", "colorfulness")


def ingest_stages(paths: list[Path], size: int) -> dict[str, float]:
    """CPU s per image of each stage of one shard job, timed one by one with the functions `write_shard` runs."""
    from ddcolor.data.ingest_jobs import file_sha256
    from ddcolor.data.prepare import colorfulness_packed, lab_encoder, prepare_pixels
    from ddcolor.data.shards import ShardRow, write_shard_file
    from ddcolor.imageio import read_rgb8_image

    spent = dict.fromkeys((*STAGES, "Parquet write (zstd)", "sha256 of the shard file"), 0.0)
    rows = []
    for path in paths:
        marks = [time.process_time()]
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        marks.append(time.process_time())
        image = read_rgb8_image(data, path.name, None)
        marks.append(time.process_time())
        pixels = prepare_pixels(image, size, "resize")
        marks.append(time.process_time())
        lightness, ab = lab_encoder().encode_packed(pixels)
        marks.append(time.process_time())
        colorfulness = colorfulness_packed(pixels)
        marks.append(time.process_time())
        for stage, start, end in zip(STAGES, marks[:-1], marks[1:], strict=True):
            spent[stage] += end - start
        rows.append(ShardRow(sha, str(path), "train", lightness, ab, colorfulness, False))
    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-shard-") as tmp:
        shard = Path(tmp) / "shard.parquet"
        start = time.process_time()
        write_shard_file(shard, rows, size, datetime(2024, 1, 1, tzinfo=UTC))
        middle = time.process_time()
        file_sha256(shard)
        spent["Parquet write (zstd)"] += middle - start
        spent["sha256 of the shard file"] += time.process_time() - middle
    return {stage: seconds / len(paths) for stage, seconds in spent.items()}


def print_ingestion(raw: Path, dest: Path, paths: list[Path], size: int, repeats: int) -> None:
    """The ingestion rows: best-of-``repeats`` CPU and wall time vs decode + resize, and the stage profile."""
    from ddcolor.data import lab_lut

    cfg = DataConfig(size=size, val_fraction=0.0, min_colorfulness=0.0, seed=0)
    start = time.process_time()
    lab_lut.load_or_build()  # once per machine (cached): steady-state ingestion uses the Lab table
    print(f"Lab table ready in {time.process_time() - start:.1f} s CPU (cached after the first build)", flush=True)
    runs, refs, stages = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(repeats):  # interleaved, so that both see the same neighbours on a shared machine
        runs.append(ingest_seconds(raw, dest, cfg))
        refs.append(decode_resize_seconds(paths, size))
        stages.append(ingest_stages(paths, size))
    load = (load_before, *os.getloadavg())
    ingest_cpu, ingest_wall = min(r[0] for r in runs), min(r[1] for r in runs)
    ref_cpu, ref_wall = min(r[0] for r in refs), min(r[1] for r in refs)
    print()
    print(f"## Ingestion, 1 process, {len(paths)} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]} -> {size} px, best of {repeats}")
    print(
        f"on {machine('cpu')}; load average {load[0]:.1f} before, {load[1]:.1f} / {load[2]:.1f} / {load[3]:.1f} after"
    )
    print()
    print("| ingestion, 1 process | CPU ms / image | wall ms / image | img/s (CPU) |")
    print("|---|---:|---:|---:|")
    ref_row = f"{ref_cpu * 1e3:.2f} | {ref_wall * 1e3:.2f} | {1 / ref_cpu:.0f}"
    print(f"| JPEG decode + bilinear resize alone (PIL) | {ref_row} |")
    print(
        f"| ddcolor.data.ingest (hash, decode, resize, Lab, colorfulness, Parquet) | {ingest_cpu * 1e3:.2f} | "
        f"{ingest_wall * 1e3:.2f} | {1 / ingest_cpu:.0f} |"
    )
    print(f"| ratio (target <= 2x) | {ingest_cpu / ref_cpu:.2f}x | {ingest_wall / ref_wall:.2f}x | |")
    print()
    print("| stage of one shard job (CPU, median of the repeats) | ms / image |")
    print("|---|---:|")
    total = 0.0
    for stage in stages[0]:
        value = float(np.median([s[stage] for s in stages]))
        total += value
        print(f"| {stage} | {value * 1e3:.2f} |")
    print(f"| sum of the stages | {total * 1e3:.2f} |")
    manifest = json.loads((dest / "manifest.json").read_text())
    shard_bytes = sum(s["bytes"] for s in manifest["shards"]) / max(manifest["counts"]["rows"], 1)
    jpeg_bytes = sum(p.stat().st_size for p in paths) / len(paths)
    print(f"Bytes per image: source JPEG {jpeg_bytes:,.0f}, shard row {shard_bytes:,.0f} (zstd).")


# --- GPU demand (estimate) -----------------------------------------------------------------------------------


def train_flops_per_image(preset: str, size: int) -> float | None:
    """FLOPs of one training image through the generator (fwd + bwd) and the VGG16-BN perceptual loss."""
    try:
        import torchvision
        from torch.utils.flop_counter import FlopCounterMode

        from ddcolor.model import build_model
    except Exception:  # pragma: no cover - optional
        return None
    torch.manual_seed(0)
    model = build_model(preset, pretrained=None).train()
    vgg = torchvision.models.vgg16_bn(weights=None).features.eval()
    x = torch.rand(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        rgb = torch.cat([x[:, :1], out], dim=1)  # any 3-channel image of the right size
        loss = out.abs().mean() + vgg(rgb).mean() + vgg(x).detach().mean()
        loss.backward()
    return float(counter.get_total_flops())


# --- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument(
        "--repeats", type=int, default=2, help="epochs (ingest runs) per measurement; the best is reported"
    )
    parser.add_argument("--keep", type=Path, default=None, help="write the JPEGs and shards here and keep them")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count for the GPU estimate")
    parser.add_argument("--only", choices=["all", "ingest"], default="all", help="ingest: the ingestion rows only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # like a DataLoader worker; the rates below are per process

    work = args.keep or Path(tempfile.mkdtemp(prefix="ddcolor-bench-"))
    try:
        raw, shards = work / "raw", work / "shards"
        print(f"writing {args.images} JPEGs {JPEG_SIZE[0]}x{JPEG_SIZE[1]} to {raw} ...", flush=True)
        paths = make_jpegs(raw, args.images)
        jpeg_bytes = sum(p.stat().st_size for p in paths) / len(paths)

        print_ingestion(raw, shards, paths, args.size, args.repeats)  # leaves the last run's shards in `shards`
        if args.only == "ingest":
            return
        cfg = DataConfig(size=args.size, val_fraction=0.0, min_colorfulness=0.0, seed=0)
        manifest = json.loads((shards / "manifest.json").read_text())
        shard_bytes = sum(s["bytes"] for s in manifest["shards"]) / manifest["counts"]["rows"]

        start = time.perf_counter()
        build_dataloader(cfg, shards, "train", batch_size=args.batch, num_workers=0)
        build_seconds = time.perf_counter() - start
        rows = []
        for workers in args.workers:
            official = DataLoader(OfficialRecipe(paths, args.size), batch_size=args.batch, num_workers=workers)
            loader = build_dataloader(cfg, shards, "train", batch_size=args.batch, num_workers=workers)
            print(f"timing {workers} workers ...", flush=True)
            rows.append((workers, *best_rates(official, args.repeats), *best_rates(loader, args.repeats)))

        raw_pixels = args.size * args.size * 3
        print()
        print(f"## Data plane, {args.images} images, {args.size} px, batch {args.batch}, on {machine('cpu')}")
        print()
        print("| DataLoader workers | official per-sample (img/s) | shards loader (img/s) | speed-up |")
        print("|---:|---:|---:|---:|")
        for workers, off, off_steady, ours, ours_steady in rows:
            print(f"| {workers}, full epoch | {off:.0f} | {ours:.0f} | {ours / off:.1f}x |")
            speedup = ours_steady / off_steady
            print(f"| {workers}, after 1st batch | {off_steady:.0f} | {ours_steady:.0f} | {speedup:.1f}x |")
        print()
        print(f"Best of {args.repeats} epochs of {args.images} images. 'full epoch' includes DataLoader worker")
        print("start-up (persistent_workers=False: every epoch pays it); 'after 1st batch' is the steady rate.")
        rows_total = manifest["counts"]["rows"]
        print(f"Building the shard loader (manifest + row index, {rows_total} rows): {build_seconds * 1e3:.0f} ms.")
        print()
        print("| storage | bytes / image |")
        print("|---|---:|")
        print(f"| source JPEG {JPEG_SIZE[0]}x{JPEG_SIZE[1]} q90 | {jpeg_bytes:,.0f} |")
        print(f"| Lab shard row at {args.size} px (uint8 L + int8 ab, zstd) | {shard_bytes:,.0f} |")
        print(f"| uncompressed {args.size}x{args.size}x3 | {raw_pixels:,} |")
        print()
        flops = None if args.no_flops else train_flops_per_image("tiny", args.size)
        sustained = 100e12  # assumption, see below
        print("GPU demand (estimate; no GPU here):")
        if flops is not None:
            need = sustained / (flops * 1.35)
            print(
                f"  counted: DDColor-tiny generator fwd+bwd + VGG16-BN perceptual at {args.size} px = "
                f"{flops / 1e9:.0f} GFLOP/image; +35% assumed for the U-Net discriminator (fwd on real and fake, "
                "bwd) and the GAN generator pass"
            )
            print(
                f"  assumed: 100 TFLOP/s sustained (bf16 on one H100, ~10% of its 989 TFLOP/s dense peak, "
                f"typical for conv+attention GAN training) -> ~{need:.0f} img/s per GPU"
            )
        else:
            need = 400.0
            print("  assumed: ~400 img/s per GPU for DDColor-tiny at 256 px (FLOP count unavailable)")
        ours_1p = next((r[4] for r in rows if r[0] == 0), None)
        off_1p = next((r[2] for r in rows if r[0] == 0), None)
        if ours_1p and off_1p:
            print(
                f"  one loader process here: shards {ours_1p:.0f} img/s, official recipe {off_1p:.0f} img/s -> "
                f"{need / ours_1p:.2f} vs {need / off_1p:.1f} CPU cores per GPU to keep up"
            )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
