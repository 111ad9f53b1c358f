"""Compiled vs eager, measured in one process with the two variants interleaved: training steps and inference.

    python bench/compile.py [--parts train,infer] [--preset tiny] [--precisions auto] [--train-size 256]
                            [--train-batch 2] [--steps 4] [--infer-size 512] [--infer-batch 1] [--repeats 6]
                            [--threads 0] [--warm-cache] [--json FILE] [--smoke]

Training (``train``): two `ddcolor.train.Trainer` objects built from the same config and seed, one with
``train.compile=false`` and one with ``train.compile=true`` (``torch.compile`` of the generator, exactly what a run
with that setting does; the losses, VGG16-BN and discriminator stay eager). Random initialisation
(``model.pretrained=null``), full loss (pixel + perceptual + GAN + colorfulness), generator AND discriminator
updates. Both trainers get the same batches, read once from the shard loader before timing (data loading is not
timed: it is the same for both). The timed quantity is one optimizer step: ``forward_backward`` + both optimizer
steps + the loss readout (`Trainer._reduce_terms`, the device sync of a real step).

Inference (``infer``): `ddcolor.model.prepare_for_inference` of one random-init network (what ``ddcolor colorize``
runs), eager vs ``torch.compile`` of the same prepared module, on a deterministic gray input.

How the ratio is made fair on a shared machine:
    * both variants live in the same process and alternate, A B B A A B ..., so a change of machine load during
      the run hits both alike (the load average before and after is printed);
    * the first call of each variant is reported separately: for the compiled one it holds the compilation
      (dynamo + AOTAutograd + inductor, forward and backward for training). ``compile s`` = first call minus the
      compiled variant's steady-state median. The steady-state figures are the median of the calls after it;
    * inductor's on-disk cache is a fresh temporary folder (a cold compile, as on a new machine or after a code
      change) unless ``--warm-cache`` is given.

Precisions: ``auto`` (default) is fp32, plus bf16 when `ddcolor.precision.native_bf16` says the device multiplies
bf16 natively (AMX / AVX-512-BF16 CPUs, sm80+ GPUs); training bf16 is ``train.amp=bf16`` autocast, inference bf16 is
``prepare_for_inference(..., "bf16")``. Also reported: how far the compiled variant's numbers are from eager's
(training: the largest relative difference of the total generator loss over the steps, same batches and same
initial weights; inference: max abs ab difference over the ab range of the eager output).

Not a test: nothing here asserts (``--smoke`` runs the smallest network at 64 px to check the script;
tests/infra/test_bench_compile.py, slow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

#: the smallest network the code accepts (timm's test_convnext + a small decoder), as in bench/gpu_check.py
_SMALL = {"num_queries": 4, "dec_layers": 1, "nf": 32, "hidden_dim": 32, "dim_feedforward": 64, "nheads": 2}
_SMALL_OVERRIDES = ["model.backbone=test_convnext", *[f"model.{k}={v}" for k, v in _SMALL.items()], "model.disc_nf=8"]


def load_average() -> str:
    """The 1-minute / 5-minute load averages, e.g. ``"1.9 / 2.3"`` (``"n/a"`` where unavailable)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.1f} / {five:.1f}"


def alternate(first, second, rounds: int):
    """Yield (variant, round) for ``rounds`` rounds in the order A B, B A, A B, ... (first call of each included)."""
    for i in range(rounds):
        pair = ((first, i), (second, i))
        yield from (pair if i % 2 == 0 else pair[::-1])


def summarize(times: list[float]) -> dict:
    """First call (s) and steady-state median (s) of one variant's call times, in call order."""
    steady = times[1:]
    return {"first_s": times[0], "steady_s": statistics.median(steady), "steady_all_s": steady}


def dynamo_graphs() -> int:
    """Graphs torch.compile has built so far in this process: a rise after a variant's first call is a recompile."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def paired_speedup(row: dict) -> float:
    """Median over the timed rounds of (eager time / compiled time) within a round: the two calls of a round ran
    back to back, so a load change between rounds cancels out (the medians of each variant alone do not pair)."""
    pairs = zip(row["eager"]["steady_all_s"], row["compiled"]["steady_all_s"], strict=True)
    return statistics.median(e / c for e, c in pairs)


# --- training ------------------------------------------------------------------------------------------------
def _trainer(config_overrides: list[str], dataset: str, out: Path):
    from ddcolor.config import load_config
    from ddcolor.train import Trainer

    trainer = Trainer(
        load_config(None, config_overrides), dataset, out_dir=out, progress=False, image_every=0, keep_last=1
    )
    trainer.setup()
    return trainer


def _train_step(trainer, batch) -> tuple[float, float]:
    """(seconds, total generator loss) of one optimizer step on ``batch``, as `Trainer._train` does it."""
    start = time.perf_counter()
    terms = trainer._reduce_terms(trainer.forward_backward([batch]))
    trainer._optimizer_step(trainer.opt_g, trainer.scaler_g, trainer.generator)
    trainer._optimizer_step(trainer.opt_d, trainer.scaler_d, trainer.discriminator)
    if trainer.device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start, terms["loss_g"]


def measure_train(args, precision: str, dataset: str, tmp: Path) -> dict:
    model = _SMALL_OVERRIDES if args.smoke else [f"model.preset={args.preset}"]
    base = [
        *model, "model.pretrained=null", f"data.size={args.train_size}", "data.val_fraction=0",
        "data.min_colorfulness=0", "data.num_workers=0", f"train.device={args.device}",
        f"train.batch_size={args.train_batch}", "train.checkpoint_every=1000000", "train.log_every=1000000",
        "train.seed=0", f"train.amp={'none' if precision == 'fp32' else precision}",
        f"train.channels_last={str(args.channels_last).lower()}",
    ]  # fmt: skip
    trainers = {
        "eager": _trainer([*base, "train.compile=false"], dataset, tmp / f"train-{precision}-eager"),
        "compiled": _trainer([*base, "train.compile=true"], dataset, tmp / f"train-{precision}-compiled"),
    }
    try:
        rounds = 1 + args.steps
        loader = iter(trainers["eager"].loader)
        batches = [next(loader) for _ in range(min(rounds, len(trainers["eager"].loader)))]
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        losses: dict[str, list[float]] = {"eager": [], "compiled": []}
        graphs = []  # graphs built so far, after each compiled step
        for variant, i in alternate("eager", "compiled", rounds):
            seconds, loss = _train_step(trainers[variant], batches[i % len(batches)])
            times[variant].append(seconds)
            graphs += [dynamo_graphs()] if variant == "compiled" else []
            losses[variant].append(loss)
            print(f"#   train {precision} step {i} {variant}: {seconds:.2f} s (load {load_average()})", flush=True)
    finally:
        for trainer in trainers.values():
            trainer.cleanup()
    loss_rel = max(abs(c - e) / max(abs(e), 1e-12) for e, c in zip(losses["eager"], losses["compiled"], strict=True))
    return {"part": "train", "precision": precision, "batch": args.train_batch, "size": args.train_size,
            "eager": summarize(times["eager"]), "compiled": summarize(times["compiled"]),
            "difference": loss_rel, "difference_kind": "max rel. diff. of the total G loss",
            "recompiles": graphs[-1] - graphs[0]}  # fmt: skip


# --- inference -----------------------------------------------------------------------------------------------
def measure_infer(args, precision: str) -> dict:
    import torch
    from infer import _bench_input

    from ddcolor.model import build_model, prepare_for_inference

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.smoke:
        model = build_model("test_convnext", pretrained=None, **_SMALL)
    else:
        model = build_model(args.preset, pretrained=None)
    model = model.eval().to(device)
    nets = {"eager": prepare_for_inference(model, precision)}
    nets["compiled"] = torch.compile(prepare_for_inference(model, precision))
    del model
    x = _bench_input(args.infer_batch, args.infer_size).to(device)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    outputs = {}
    graphs = []
    for variant, i in alternate("eager", "compiled", 1 + args.repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = nets[variant](x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[variant].append(time.perf_counter() - start)
        graphs += [dynamo_graphs()] if variant == "compiled" else []
        outputs[variant] = out.float()
        print(f"#   infer {precision} call {i} {variant}: {times[variant][-1]:.3f} s", flush=True)
    ref = outputs["eager"]
    span = float(ref.max() - ref.min())
    diff = float((outputs["compiled"] - ref).abs().max())
    return {"part": "infer", "precision": precision, "batch": args.infer_batch, "size": args.infer_size,
            "eager": summarize(times["eager"]), "compiled": summarize(times["compiled"]),
            "difference": diff / span if span else float("nan"),
            "difference_kind": "max abs ab diff. / eager ab range", "recompiles": graphs[-1] - graphs[0]}  # fmt: skip


# --- report --------------------------------------------------------------------------------------------------
def table(rows: list[dict], preset: str) -> str:
    lines = [
        "| part | preset | px | batch | precision | eager img/s | compiled img/s | compiled / eager, paired rounds "
        "| best / best | compile s (first call) | eager first call s | graphs built after the first call "
        "| compiled vs eager |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eager, compiled = r["eager"], r["compiled"]
        ips = {k: r["batch"] / r[k]["steady_s"] for k in ("eager", "compiled")}
        best = min(eager["steady_all_s"]) / min(compiled["steady_all_s"])
        compile_s = compiled["first_s"] - compiled["steady_s"]
        lines.append(
            f"| {r['part']} | {preset} | {r['size']} | {r['batch']} | {r['precision']} | {ips['eager']:.3g} "
            f"| {ips['compiled']:.3g} | **{paired_speedup(r):.2f}x** | {best:.2f}x | {compile_s:.0f} "
            f"({compiled['first_s']:.0f}) | {eager['first_s']:.1f} | {r['recompiles']} | {r['difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="train,infer", help="comma-separated: train, infer")
    parser.add_argument("--preset", default="tiny", help="atto, tiny or large")
    parser.add_argument("--precisions", default="auto", help="fp32, bf16, or auto (fp32 + bf16 where native)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--train-size", type=int, default=256, help="training crop, px (multiple of 32)")
    parser.add_argument("--train-batch", type=int, default=2, help="images per training step")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per variant, after the first")
    parser.add_argument("--channels-last", action="store_true", help="train.channels_last=true for both variants")
    parser.add_argument("--infer-size", type=int, default=512, help="inference input, px (multiple of 32)")
    parser.add_argument("--infer-batch", type=int, default=1, help="images per inference call")
    parser.add_argument("--repeats", type=int, default=6, help="timed inference calls per variant, after the first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--warm-cache", action="store_true", help="use inductor's usual on-disk cache (not cold)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--smoke", action="store_true", help="smallest network, 64 px, 1 timed step: checks the script")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - {"train", "infer"}:
        parser.error(f"--parts: unknown {sorted(set(parts) - {'train', 'infer'})}; choose from train, infer")
    if args.smoke:
        args.train_size = args.infer_size = 64
        args.steps = args.repeats = 1

    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-compile-") as tmp:
        tmp = Path(tmp)
        if not args.warm_cache:  # before torch reads its inductor config
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / "inductor-cache")
        import torch
        from procstats import machine

        from ddcolor.precision import native_bf16

        if args.threads:
            torch.set_num_threads(args.threads)
        native, why = native_bf16(args.device)
        precisions = [p for p in args.precisions.split(",") if p]
        if precisions == ["auto"]:
            precisions = ["fp32", "bf16"] if native else ["fp32"]
        where = machine(args.device)
        print(f"# {where}; torch {torch.__version__}, python {platform.python_version()}, threads "
              f"{torch.get_num_threads()}; native bf16: {native} ({why})")  # fmt: skip
        print(f"# inductor cache: {'warm (usual folder)' if args.warm_cache else 'cold (fresh folder)'}; load "
              f"average (1 / 5 min) at start {load_average()}", flush=True)  # fmt: skip

        preset = "test_convnext (smoke)" if args.smoke else args.preset
        rows = []
        dataset = None
        if "train" in parts:
            import train as bench_train

            dataset = bench_train.make_dataset(tmp / "data", args.train_size, max(2 * (1 + args.steps), 8))
        for precision in precisions:
            if "train" in parts:
                rows.append(measure_train(args, precision, dataset, tmp))
                print(table(rows[-1:], preset), flush=True)
            if "infer" in parts:
                rows.append(measure_infer(args, precision))
                print(table(rows[-1:], preset), flush=True)
        end_load = load_average()

    print()
    print(f"# {where}, torch threads {torch.get_num_threads()}; load average (1 / 5 min) at the end {end_load}")
    print(table(rows, preset))
    print()
    print(
        "img/s: steady-state median of each variant; paired rounds: median over the rounds of eager time / "
        "compiled time within the round (the headline: robust to load changes between rounds); best / best: "
        "fastest eager call / fastest compiled call; compile s: the compiled variant's first call minus its "
        "steady-state time (first call in parentheses); compiled vs eager: "
        + "; ".join(sorted({f"{r['part']}: {r['difference_kind']}" for r in rows}))
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "preset": preset, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
