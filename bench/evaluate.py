"""Evaluation benchmark: `ddcolor.evaluate.evaluate` with the colorization network in fp32, bf16 and auto.

    python bench/evaluate.py [--preset atto] [--size 128] [--images 24] [--repeats 3] [--variants fp32,bf16,auto]
                             [--threads N]

Inputs: ``--images`` built-in sample images (`ddcolor.data.samples`) ingested at ``--size`` px, about half of them
in the val split that `evaluate` reads. The model is a random-init ``--preset`` (speed does not depend on the
weights); the metric networks (Inception for FID, AlexNet for LPIPS) are random-init too and always run in fp32:
the precision only changes the colorization network's forward, as in ``ddcolor evaluate --precision``.

All variants run in one process, interleaved (fp32, bf16, auto, fp32, ...) after one warm-up evaluation each; the
table shows the best of ``--repeats`` wall times per variant (a busy shared machine only adds time). ``auto``
resolves once per process (`ddcolor.precision`); the last line compares it with the better of fp32 and bf16
(target: at most 1.1x the time). Every row names the machine kind (AVX2 / AVX-512 / AVX-512-BF16 / AMX CPU, or the
GPU). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from procstats import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("fp32", "bf16", "auto")


def make_dataset(folder: Path, size: int, count: int) -> str:
    from ddcolor.config import load_config
    from ddcolor.data.ingest import ingest
    from ddcolor.data.samples import write_samples

    write_samples(str(folder / "raw"), count=count)
    cfg = load_config(None, [f"data.size={size}", "data.val_fraction=0.5", "data.min_colorfulness=0"])
    ingest(str(folder / "raw"), str(folder / "shards"), cfg, num_workers=0)
    return str(folder / "shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="atto", help="atto, tiny or large (random init)")
    parser.add_argument("--size", type=int, default=128, help="data and evaluation size, px (multiple of 32)")
    parser.add_argument("--images", type=int, default=24, help="sample images ingested (about half are val)")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per variant (best is shown)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {VARIANTS}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {VARIANTS}")

    from ddcolor.config import EvalConfig
    from ddcolor.evaluate import evaluate
    from ddcolor.model import build_model
    from ddcolor.precision import resolve_precision

    logging.basicConfig(level=logging.WARNING)
    where = machine(args.device)
    device = torch.device(args.device)
    print(f"# {where}; torch {torch.__version__} threads {torch.get_num_threads()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-eval-") as tmp:
        dataset = make_dataset(Path(tmp), args.size, args.images)
        torch.manual_seed(0)
        model = build_model(args.preset, pretrained=None).eval().to(device)
        config = EvalConfig(image_size=args.size, batch_size=8)

        def once(variant: str) -> tuple[float, int]:
            start = time.perf_counter()
            result = evaluate(model, dataset, config, pretrained=None, device=device, progress=False, precision=variant)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start, result.n_images

        best: dict[str, float] = {}
        n_images = 0
        for variant in variants:
            once(variant)  # warm-up: oneDNN primitives, metric networks built
        for _ in range(args.repeats):
            for variant in variants:
                seconds, n_images = once(variant)
                best[variant] = min(best.get(variant, float("inf")), seconds)
                print(f"#   {variant}: {seconds:.2f} s", flush=True)
    resolved = resolve_precision("auto", device)
    print()
    print(f"{args.preset}, {n_images} val images at {args.size} px, metrics fid+colorfulness+psnr+lpips (random nets)")
    print()
    print("| machine | preset | network precision | best s | img/s |")
    print("|---|---|---|---:|---:|")
    for variant in variants:
        name = f"auto (-> {resolved})" if variant == "auto" else variant
        print(f"| {where} | {args.preset} | {name} | {best[variant]:.2f} | {n_images / best[variant]:.1f} |")
    pair = [(best[v], v) for v in ("fp32", "bf16") if v in best]
    if "auto" in best and pair:
        fastest, which = min(pair)
        print()
        print(
            f"auto vs the better of fp32/bf16 ({which}) on {where}: {best['auto'] / fastest:.2f}x the time "
            "(target <= 1.1x)"
        )


if __name__ == "__main__":
    main()
