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
optimizer steps. The timed quantity is a whole training iteration including fetching the batch from the loader
(that wait is also reported alone: it is what differs between the paths). The two paths alternate, iteration by
iteration (official ours, ours official, ...), so that a change of machine load hits both alike; median of
``--steps`` iterations of each after ``--warmup`` rounds, and the paired ratio (median over the rounds of official
time / ours time). Prints a Markdown row per path and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _forever(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _iteration(trainer, batches) -> tuple[float, float]:
    """(seconds for one training iteration, of which seconds waiting for the batch): fetch, G + D step."""
    start = time.perf_counter()
    batch = next(batches)
    fetched = time.perf_counter()
    trainer.forward_backward([batch])
    trainer._optimizer_step(trainer.opt_g, trainer.scaler_g, trainer.generator)
    trainer._optimizer_step(trainer.opt_d, trainer.scaler_d, trainer.discriminator)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, fetched - start


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

    load = os.getloadavg()
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
            streams = {"official": _forever(official), "ours": _forever(trainer.loader)}
            rows: dict[str, list[tuple[float, float]]] = {"official": [], "ours": []}
            # the two paths alternate, official ours / ours official / ..., so load changes hit both alike
            for i in range(args.warmup + args.steps):
                for name in ("official", "ours") if i % 2 == 0 else ("ours", "official"):
                    timing = _iteration(trainer, streams[name])
                    if i >= args.warmup:
                        rows[name].append(timing)
        finally:
            trainer.cleanup()
    load_end = os.getloadavg()
    result = {k: statistics.median(t for t, _ in v) for k, v in rows.items()}
    fetch = {k: statistics.median(f for _, f in v) for k, v in rows.items()}
    print(
        f"# {cpu_name()}, torch threads {torch.get_num_threads()}; {args.preset} {args.size} px batch {args.batch}, "
        f"full loss, G+D step, fp32; {args.workers} DataLoader workers; median of {args.steps} iterations of each "
        f"after {args.warmup} warm-up, interleaved; ingestion of {args.images} JPEGs {ingest_s:.1f} s; load "
        f"average (1 / 5 min) {load[0]:.1f} / {load[1]:.1f} at the start, {load_end[0]:.1f} / {load_end[1]:.1f} at "
        "the end"
    )
    paired = statistics.median(o / u for (o, _), (u, _) in zip(rows["official"], rows["ours"], strict=True))
    print("| path | s/iteration | of which waiting for the batch, ms | img/s | img/s vs official |")
    print("|---|---:|---:|---:|---:|")
    for name in ("official", "ours"):
        ratio = result["official"] / result[name]
        print(
            f"| {name} | {result[name]:.2f} | {1e3 * fetch[name]:.1f} | {args.batch / result[name]:.2f} "
            f"| {ratio:.2f}x |"
        )
    print(f"ours vs official, paired (median over rounds of official time / ours time): {paired:.2f}x")
    print(
        f"data path alone (the batch wait): ours {fetch['official'] / fetch['ours']:.1f}x faster than official; "
        f"its share of the official iteration {100 * fetch['official'] / result['official']:.1f}%"
    )
    print(json.dumps({k: [[round(t, 3), round(f, 4)] for t, f in v] for k, v in rows.items()}))


if __name__ == "__main__":
    main()
