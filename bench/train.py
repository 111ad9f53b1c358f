"""Training-step benchmark: the real `ddcolor.train.Trainer`, fp32 vs bf16 vs auto AMP, channels-last, compile.

    python bench/train.py [--presets atto,tiny] [--device cpu|cuda] [--size 256] [--steps N] [--warmup W]
                          [--batch B] [--variants fp32,bf16,auto,bf16_cl,bf16_cl_compile] [--workers K] [--timeout S]

Inputs: `ddcolor.data.samples.write_samples` (the scikit-image photos and their crops), ingested once by
`ddcolor.data.ingest` at ``--size`` px (``resize``) into a temporary shard dataset that every variant reads.

Each (preset, variant) runs in a fresh subprocess: ``Trainer(...).setup(); .train()`` for ``--warmup + --steps``
optimizer steps with the full DDColor loss (pixel + perceptual + GAN + colorfulness, the default weights; the
perceptual VGG16-BN and the encoder are randomly initialised, ``model.pretrained=null``, which costs the same time
as ImageNet weights), generator AND discriminator updates, data loading included, as in a real run. Step time is
the trainer's own per-step measurement (``metrics.jsonl``, CUDA-synchronised); the table shows the median of the
timed steps (the warm-up steps, oneDNN / cuDNN autotuning and compilation, are dropped).

Variants:
    fp32             ``train.amp=none``: fp32 eager (on CUDA the trainer enables TF32 matmuls/convolutions).
    bf16             ``train.amp=bf16``: bf16 autocast, NCHW.
    auto             ``train.amp=auto`` (the default): bf16 where the machine has native bf16, else fp32; the table
                     says what it resolved to and compares it with the better of fp32 and bf16 (target <= 1.1x).
    bf16_cl          ``train.amp=bf16 train.channels_last=true``: bf16 autocast, NHWC memory format.
    bf16_cl_compile  the same plus ``train.compile=true`` (``torch.compile`` of the generator). Its warm-up steps
                     hold the compilation (minutes on a CPU; raise ``--warmup`` so that no timed step recompiles);
                     bench/compile.py measures compiled vs eager with the two interleaved in one process and the
                     compile time reported separately, the fairer comparison on a shared machine.
A variant that raises or exceeds ``--timeout`` is reported as ``failed: <reason>`` in the table.

Peak memory, measured over the timed steps only (the tracker hook resets the peak when the warm-up ends):
    CPU   peak resident set (VmHWM after ``/proc/self/clear_refs`` = 5 at the end of the warm-up) minus the
          resident set before the trainer was built: weights, optimizer state, activations, allocator caches.
          Falls back to the ``getrusage`` max-RSS delta where clear_refs is unavailable.
    CUDA  ``torch.cuda.max_memory_allocated()`` (reset at the end of the warm-up): weights, optimizer state,
          activations; not the caching allocator's reserve.

Not a test: nothing here asserts. Target on a GPU: ``bf16_cl`` >= 2x the fp32 images/s for ``tiny`` at the same
batch size. Numbers on a shared 2-core CPU are noisy. Every row names the machine kind (AVX2 / AVX-512 /
AVX-512-BF16 / AMX CPU, or the GPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from procstats import machine, reset_peak_rss, status_kib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "fp32": ["train.amp=none", "train.channels_last=false", "train.compile=false"],
    "bf16": ["train.amp=bf16", "train.channels_last=false", "train.compile=false"],
    "auto": ["train.amp=auto", "train.channels_last=false", "train.compile=false"],
    "bf16_cl": ["train.amp=bf16", "train.channels_last=true", "train.compile=false"],
    "bf16_cl_compile": ["train.amp=bf16", "train.channels_last=true", "train.compile=true"],
}
NAMES = {
    "fp32": "fp32 eager",
    "bf16": "bf16 AMP",
    "auto": "auto AMP",
    "bf16_cl": "bf16 AMP + channels_last",
    "bf16_cl_compile": "bf16 + cl + compile",
}
SEED = 0


# --- worker (one preset x variant, one fresh process) ----------------------------------------------------------
class _PeakTracker:
    """A `ddcolor.tracking.Tracker` that only resets the memory peak when the warm-up ends and reads it at the end."""

    run_id = None

    def __init__(self, device: torch.device, warmup: int, last: int, base_kib: int | None) -> None:
        self.device, self.warmup, self.last, self.base_kib = device, warmup, last, base_kib
        self.peak_mib: float | None = None
        self.method = ""
        self.maxrss_at_warmup = 0
        self.clear_refs = False

    def log_metrics(self, metrics: dict, step: int) -> None:
        if step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                self.maxrss_at_warmup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.clear_refs = self.base_kib is not None and reset_peak_rss()
        elif step == self.last:
            if self.device.type == "cuda":
                self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
                self.method = "cuda max_memory_allocated"
            elif self.clear_refs:
                self.peak_mib = (status_kib("VmHWM") - self.base_kib) / 1024
                self.method = "VmHWM (reset after warm-up) - VmRSS before setup"
            else:
                peak = max(self.maxrss_at_warmup, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
                self.peak_mib = (peak - (self.base_kib or 0)) / 1024
                self.method = "ru_maxrss - VmRSS before setup"

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_image(self, image, key: str, step: int) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def log_model(self, model_dir_or_checkpoint, name: str = "generator") -> None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass


def worker(spec: dict) -> dict:
    from ddcolor.config import load_config
    from ddcolor.train import Trainer
    from ddcolor.train.trainer import METRICS_FILE

    logging.basicConfig(level=logging.ERROR)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    warmup, steps = spec["warmup"], spec["steps"]
    config = load_config(None, spec["overrides"])
    gc.collect()
    base_kib = status_kib("VmRSS") if device.type == "cpu" else None
    tracker = _PeakTracker(device, warmup, warmup + steps, base_kib)
    out = Path(spec["out"])
    trainer = Trainer(
        config,
        spec["dataset"],
        out_dir=out,
        tracker=tracker,
        max_steps=warmup + steps,
        num_workers=spec["workers"],
        progress=False,
        image_every=0,
        keep_last=1,
    )
    result: dict = {"threads": torch.get_num_threads()}
    try:
        trainer.setup()
        result["generator_params"] = sum(p.numel() for p in trainer.generator.parameters())
        result["amp"] = trainer.amp  # train.amp as resolved on this machine (auto -> bf16 | none)
        trainer.train()
    except Exception as err:  # reported in the table, e.g. torch.compile failing on CPU
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        first = first.replace("|", "/")
        result["error"] = f"{type(err).__name__}: {first}"[:120]
        return result
    finally:
        trainer.cleanup()
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    batch = config.train.batch_size
    result["step_ms"] = [1e3 * batch / r["images_per_s"] for r in records]
    result["peak_mib"] = tracker.peak_mib
    result["memory_method"] = tracker.method
    return result


# --- parent --------------------------------------------------------------------------------------------------
def run_worker(spec: dict, timeout: float) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"error": f"exit code {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def make_dataset(folder: Path, size: int, count: int) -> str:
    from ddcolor.config import load_config
    from ddcolor.data.ingest import ingest
    from ddcolor.data.samples import write_samples

    write_samples(str(folder / "raw"), count=count)
    cfg = load_config(None, [f"data.size={size}", "data.val_fraction=0", "data.min_colorfulness=0"])
    ingest(str(folder / "raw"), str(folder / "shards"), cfg, num_workers=0)
    return str(folder / "shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="atto,tiny", help="comma-separated presets (atto, tiny, large)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available, else cpu)")
    parser.add_argument("--size", type=int, default=256, help="training crop size, px (multiple of 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 5 CPU, 30 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 4 CPU, 16 CUDA)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated from {list(VARIANTS)}")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 0 CPU, 4 CUDA)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant before it counts as failed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cuda = device.startswith("cuda")
    steps = args.steps or (30 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    batch = args.batch or (16 if cuda else 4)
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    presets = [p for p in args.presets.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if "fp32" not in variants:
        variants.insert(0, "fp32")
    if warmup < 1:
        parser.error("--warmup must be >= 1 (the memory peak is reset when the warm-up ends)")

    if args.threads:
        torch.set_num_threads(args.threads)
    where = machine(device)
    print(f"# device: {device} ({where}); torch {torch.__version__}, python {platform.python_version()}")
    if not cuda:
        print(f"# CPU capability {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}")
    print(
        f"# {args.size} px, batch {batch}, {warmup} warm-up + {steps} timed steps (median), DataLoader workers "
        f"{workers}; full loss (pixel + perceptual[random VGG] + GAN + colorfulness), G and D updates"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-train-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        dataset = make_dataset(tmp / "data", args.size, max(2 * batch, 16))
        print(f"# dataset: {max(2 * batch, 16)} sample images ingested in {time.perf_counter() - start:.1f} s")
        for preset in presets:
            for variant in variants:
                overrides = [
                    f"model.preset={preset}",
                    "model.pretrained=null",
                    f"data.size={args.size}",
                    "data.val_fraction=0",
                    "data.min_colorfulness=0",
                    f"train.device={device}",
                    f"train.batch_size={batch}",
                    "train.checkpoint_every=1000000",
                    "train.log_every=1000000",
                    f"train.seed={SEED}",
                    *VARIANTS[variant],
                ]
                spec = {
                    "overrides": overrides, "dataset": dataset, "out": str(tmp / f"{preset}-{variant}"),
                    "device": device, "warmup": warmup, "steps": steps, "workers": workers, "threads": args.threads,
                }  # fmt: skip
                start = time.perf_counter()
                res = run_worker(spec, args.timeout)
                wall = time.perf_counter() - start
                row = {"preset": preset, "variant": variant, "wall_s": wall, **res}
                if "error" not in res:
                    timed = res["step_ms"][warmup:]
                    row["ms"] = statistics.median(timed)
                    row["img_s"] = batch * 1e3 / row["ms"]
                    row["warmup_ms"] = res["step_ms"][:warmup]
                    print(
                        f"#   {preset} {variant}: {row['ms']:.0f} ms/step, {row['img_s']:.2f} img/s, peak "
                        f"{row['peak_mib']:.0f} MiB (warm-up steps {', '.join(f'{m:.0f}' for m in row['warmup_ms'])}"
                        f" ms; {wall:.0f} s wall)",
                        flush=True,
                    )
                else:
                    print(f"#   {preset} {variant}: failed: {res['error']} ({wall:.0f} s wall)", flush=True)
                rows.append(row)

    print()
    print("| machine | preset | path | batch | ms/step | img/s | peak MiB | img/s vs fp32 eager |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    base = {r["preset"]: r.get("img_s") for r in rows if r["variant"] == "fp32"}
    for r in rows:
        name = NAMES[r["variant"]] + (f" (-> {r['amp']})" if r["variant"] == "auto" and "amp" in r else "")
        if "error" in r:
            print(f"| {where} | {r['preset']} | {name} | {batch} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['img_s'] / base[r['preset']]:.2f}x" if base.get(r["preset"]) else "n/a"
        print(
            f"| {where} | {r['preset']} | {name} | {batch} | {r['ms']:.0f} | {r['img_s']:.2f} "
            f"| {r['peak_mib']:.0f} | {ratio} |"
        )
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    print()
    print(f"peak memory: {'; '.join(methods) or 'n/a'} (see the docstring)")
    for r in rows:
        ms = {x["variant"]: x.get("ms") for x in rows if x["preset"] == r["preset"] and "error" not in x}
        best = [(ms[v], v) for v in ("fp32", "bf16") if ms.get(v)]
        if r["variant"] == "auto" and ms.get("auto") and best:
            fastest, which = min(best)
            print(
                f"auto vs the better of fp32/bf16 ({which}), {r['preset']} on {where}: {ms['auto'] / fastest:.2f}x the "
                "time (target <= 1.1x)"
            )


if __name__ == "__main__":
    main()
