"""The official training data path vs ours, with the same generator + discriminator step, at the same batch and size.

    python bench/official_train.py [--preset atto] [--size 128] [--batch 4] [--steps 4] [--warmup 1] [--workers 0]

Official path (what a user of the official recipe runs): a per-sample ``Dataset`` over the source JPEGs that, for
every sample of every epoch, decodes the JPEG, resizes it to ``--size`` (bilinear, as cv2's INTER_LINEAR default),
converts sRGB -> Lab with ``skimage.color.rgb2lab`` and builds the gray input with ``skimage.color.lab2rgb`` of
(L, 0, 0), in a ``torch.utils.data.DataLoader`` (``bench/data.py`` ``OfficialRecipe``, following
/work/shared/reference/ddcolor_official_spec.md). The official BasicSR training code itself is not installed on
this machine (no network), so this is a faithful re-statement of its data path, not the official code.

Our path: `ddcolor.data.loader` over the same images ingested once into Lab shards (ingestion time reported
separately; it is paid once per dataset, not per epoch).

Step, identical for both: one `ddcolor.train.Trainer` (random init, full loss: pixel + perceptual + GAN +
colorfulness) runs ``forward_backward`` on the batch (generator step, then discriminator step, as BasicSR) and both
optimizer steps. The timed quantity is a whole training iteration including fetching the batch from the loader.
Median of ``--steps`` iterations after ``--warmup``. Prints a Markdown row per path and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from procstats import cpu_name  # noqa: E402

import data as bench_data  # noqa: E402


def _iteration_times(trainer, loader, warmup: int, steps: int) -> list[float]:
    times, it = [], iter(loader)
    for i in range(warmup + steps):
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        trainer.forward_backward([batch])
        trainer._optimizer_step(trainer.opt_g, trainer.scaler_g, trainer.generator)
        trainer._optimizer_step(trainer.opt_d, trainer.scaler_d, trainer.discriminator)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="atto")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both paths")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from torch.utils.data import DataLoader

    from ddcolor.config import load_config
    from ddcolor.data.ingest import ingest
    from ddcolor.train import Trainer

    with tempfile.TemporaryDirectory(prefix="ddcolor-official-train-") as tmp:
        tmp = Path(tmp)
        paths = bench_data.make_jpegs(tmp / "raw", args.images)
        config = load_config(
            None,
            [
                f"model.preset={args.preset}", "model.pretrained=null", f"data.size={args.size}",
                "data.val_fraction=0", "data.min_colorfulness=0", "data.resize_mode=resize",
                f"data.num_workers={args.workers}", f"train.device={args.device}", f"train.batch_size={args.batch}",
                "train.amp=none", "train.seed=0",
            ],
        )  # fmt: skip
        start = time.perf_counter()
        ingest(str(tmp / "raw"), str(tmp / "shards"), config, num_workers=0)
        ingest_s = time.perf_counter() - start
        trainer = Trainer(config, str(tmp / "shards"), out_dir=tmp / "run", progress=False, image_every=0)
        trainer.setup()
        try:
            official = DataLoader(
                bench_data.OfficialRecipe(paths, args.size), batch_size=args.batch, shuffle=True,
                num_workers=args.workers, drop_last=True,
            )  # fmt: skip
            rows = {}
            for name, loader in (("official", official), ("ours", trainer.loader), ("official ", official)):
                rows.setdefault(name.strip(), []).extend(_iteration_times(trainer, loader, args.warmup, args.steps))
        finally:
            trainer.cleanup()
    # the official path ran twice (before and after ours) so that a drift of the machine's load shows up
    result = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"# {cpu_name()}, torch threads {torch.get_num_threads()}; {args.preset} {args.size} px batch {args.batch}, "
        f"full loss, G+D step, fp32; {args.workers} DataLoader workers; median of {len(rows['ours'])} (ours) / "
        f"{len(rows['official'])} (official) iterations; ingestion of {args.images} JPEGs {ingest_s:.1f} s"
    )
    print("| path | s/iteration | img/s | ours vs official |")
    print("|---|---:|---:|---:|")
    for name in ("official", "ours"):
        ratio = result["official"] / result[name]
        print(f"| {name} | {result[name]:.2f} | {args.batch / result[name]:.2f} | {ratio:.2f}x |")
    print(json.dumps({k: [round(t, 3) for t in v] for k, v in rows.items()}))


if __name__ == "__main__":
    main()
