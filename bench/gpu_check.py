"""Every GPU measurement of the project in one command, under 8 minutes on one GPU, with partial results on time-out.

    python bench/gpu_check.py OUT_DIR                       # on a GPU machine (device cuda)
    python bench/gpu_check.py OUT_DIR --device cpu --smoke  # tiny sizes, seconds: proves the script works here
    python bench/gpu_check.py OUT_DIR --parts infer,train    # a subset of: env infer train loader learn colorize pytest

Each part runs in a fresh subprocess with its own time limit (``PART_SECONDS``, scaled by ``--budget``) and appends
one JSON line per measurement to ``OUT_DIR/<part>.jsonl`` as soon as it has it; after every part the parent rewrites
``OUT_DIR/results.json`` (all rows, with the part's status: ok / failed / timed out) and ``OUT_DIR/results.md`` (one
Markdown table per part). So a part that runs out of time still leaves the rows it finished, and the next part
runs anyway. Within a part, rows are ordered cheap-first and a row that would start after the part's deadline is
recorded as skipped.

Parts (full run; ``--smoke`` shrinks every size, see ``SMOKE``):
    env       GPU / CPU name, torch, CUDA and cuDNN versions, GEMM rate fp32/tf32/bf16.
    infer     random-init ``tiny`` and ``large`` at 512 px, batch 1 and 8: eager fp32 (TF32 off: the reference),
              ``prepare_for_inference`` fp32 / bf16 / fp16, bf16 + CUDA graph (captured once, replayed), bf16 +
              ``torch.compile``; ms/img, img/s, peak GPU memory (max_memory_allocated above the loaded model),
              max abs and relative ab difference to eager fp32 on the same input.
    train     ``bench/train.py`` workers (each a fresh process, the real `Trainer`, full loss, G and D steps):
              ``tiny`` at 256 px, batch 16: fp32, bf16 AMP, bf16 + channels_last, + torch.compile; img/s,
              peak memory, ratio to fp32 (target: bf16 >= 2x fp32).
    loader    `ddcolor.data.loader` over the same shards, batch 16, 0 and 4 DataLoader workers: img/s (does it
              keep up with the train rows?).
    learn     ``atto`` from random init for ~100 s on the built-in sample photos, the protocol of
              ``tests/training/test_learning.py`` (held-out blocks of each photo) at 128 px: held-out ab L1 and PSNR
              vs the gray baseline.
    colorize  ``ddcolor colorize`` (the CLI, a subprocess) over 64 sample JPEGs at input size 512, bf16, batch 8:
              end-to-end img/s including decode and encode.
    pytest    ``pytest -m cuda`` (tests that also run on CUDA: colorize, train steps, compiled steps, DDP with one
              process, export); they skip without CUDA. ``--smoke`` runs ``tests/infra/test_cuda.py`` only.

Random-init weights everywhere (speed does not depend on them). Not a test: nothing here asserts; the smoke run is
checked by ``tests/infra/test_gpu_check.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

PARTS = ("env", "infer", "train", "loader", "learn", "colorize", "pytest")
#: seconds per part on a GPU (total 450 s, under the 8-minute target with process start-up)
PART_SECONDS = {"env": 20, "infer": 120, "train": 110, "loader": 20, "learn": 130, "colorize": 30, "pytest": 60}

FULL = {
    "infer_presets": ["tiny", "large"], "infer_model": {}, "infer_size": 512, "infer_batches": [1, 8],
    "infer_repeats": 20, "infer_compile": True,
    "train_preset": ["model.preset=tiny"], "train_size": 256, "train_batch": 16, "train_warmup": 5,
    "train_steps": 15, "train_workers": 4, "train_variants": ["fp32", "bf16", "bf16_cl", "bf16_cl_compile"],
    "loader_workers": [0, 4], "loader_images": 64,
    "learn_config": ["model.preset=atto"], "learn_size": 128, "learn_batch": 16, "learn_seconds": 100,
    "colorize_images": 64, "colorize_size": 512, "colorize_model": ["tiny", {}], "colorize_batch": 8,
    "pytest_args": ["-m", "cuda", "tests"],
}  # fmt: skip
#: the smallest network the code accepts (timm's test_convnext + a small decoder), 64 px, one repeat
_SMALL = {"num_queries": 4, "dec_layers": 1, "nf": 32, "hidden_dim": 32, "dim_feedforward": 64, "nheads": 2}
_SMALL_OVERRIDES = ["model.backbone=test_convnext", *[f"model.{k}={v}" for k, v in _SMALL.items()], "model.disc_nf=8"]
SMOKE = {
    "infer_presets": ["test_convnext"], "infer_model": _SMALL, "infer_size": 64, "infer_batches": [1, 2],
    "infer_repeats": 1, "infer_compile": False,
    "train_preset": _SMALL_OVERRIDES, "train_size": 64, "train_batch": 2, "train_warmup": 1, "train_steps": 1,
    "train_workers": 0, "train_variants": ["fp32", "bf16", "bf16_cl"],
    "loader_workers": [0], "loader_images": 8,
    "learn_config": _SMALL_OVERRIDES, "learn_size": 64, "learn_batch": 4, "learn_seconds": 0,
    "colorize_images": 4, "colorize_size": 64, "colorize_model": ["test_convnext", _SMALL], "colorize_batch": 2,
    "pytest_args": ["-m", "cuda", "tests/infra/test_cuda.py"],
}  # fmt: skip


# --- helpers used inside parts ---------------------------------------------------------------------------------
class Part:
    """What a part process knows: its settings, output file and deadline; ``row()`` appends one result line."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.settings: dict = SMOKE if spec["smoke"] else FULL
        self.device: str = spec["device"]
        self.out = Path(spec["out"])
        self.deadline = spec["deadline"]
        self.file = self.out / f"{spec['part']}.jsonl"

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **fields) -> None:
        with self.file.open("a") as fh:
            fh.write(json.dumps(fields, default=str) + "\n")
        print(json.dumps(fields, default=str), flush=True)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def _load_bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(part: Part) -> str:
    """The sample photos ingested at the train size, shared by the train and loader parts (built once per run)."""
    folder = part.out / "work" / f"shards-{part.settings['train_size']}"
    if not (folder / "manifest.json").exists():
        bench_train = _load_bench_module("train")
        bench_train.make_dataset(folder.parent / f"data-{part.settings['train_size']}", part.settings["train_size"], 64)
        (folder.parent / f"data-{part.settings['train_size']}" / "shards").rename(folder)
    return str(folder)


# --- parts -----------------------------------------------------------------------------------------------------
def part_env(part: Part) -> None:
    import torch
    from procstats import cpu_name

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_name(), "cpus": os.cpu_count()}
    if part.cuda:
        props = torch.cuda.get_device_properties(part.device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
        )  # fmt: skip
    part.row(kind="env", **info)
    n = 8192 if part.cuda else 512
    for name, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
        if name == "tf32" and not part.cuda:
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=part.device, dtype=dtype)
        b = torch.randn(n, n, device=part.device, dtype=dtype)
        best = float("inf")
        for _ in range(4):
            part.sync()
            start = time.perf_counter()
            a @ b
            part.sync()
            best = min(best, time.perf_counter() - start)
        part.row(kind="gemm", dtype=name, n=n, gflops=round(2 * n**3 / best / 1e9, 1))


def _bench_input(batch: int, size: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(batch, 1, max(1, size // 16), max(1, size // 16), generator=gen)
    gray = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    gray = (gray + 0.05 * torch.rand(batch, 1, size, size, generator=gen)).clamp(0, 1)
    return gray.expand(-1, 3, -1, -1).contiguous()


def _timed(part: Part, fn, repeats: int) -> tuple[list[float], object]:
    out = fn()  # warm-up (cuDNN autotuning, allocations, compilation)
    out = fn()
    part.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        part.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times, out


def part_infer(part: Part) -> None:
    import torch

    s = part.settings
    device = torch.device(part.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the eager fp32 reference is true fp32
    torch.backends.cudnn.allow_tf32 = False
    variants = ["eager", "fp32", "bf16", "fp16"] + (["bf16_graph"] if part.cuda else [])
    compiled = ["bf16_compile"] if s["infer_compile"] else []
    for preset in s["infer_presets"]:
        for batch in s["infer_batches"]:
            for variant in variants + compiled:
                base = dict(kind="infer", preset=preset, size=s["infer_size"], batch=batch, path=variant)
                if part.left() < 10:
                    part.row(**base, error="skipped: part deadline")
                    continue
                try:
                    part.row(**base, **_infer_one(part, preset, batch, variant, device))
                except Exception as err:  # one failed path never stops the others
                    part.row(
                        **base, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    )
                finally:
                    if part.cuda:
                        torch.cuda.empty_cache()


_REFERENCE: dict = {}


def _infer_one(part: Part, preset: str, batch: int, variant: str, device) -> dict:
    import torch

    from ddcolor.model import build_model, prepare_for_inference

    s = part.settings
    torch.manual_seed(0)
    model = build_model(preset, pretrained=None, **s["infer_model"]).eval().to(device)
    x = _bench_input(batch, s["infer_size"]).to(device)
    key = (preset, batch)
    if key not in _REFERENCE:
        with torch.no_grad():
            _REFERENCE[key] = model(x).float()
    precision = {"eager": None, "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(variant, "bf16")
    net = model if precision is None else prepare_for_inference(model, precision)
    if net is not model:
        del model
    if part.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    compile_s = None
    if variant == "bf16_compile":
        start = time.perf_counter()
        net = torch.compile(net)
        with torch.no_grad():
            net(x)
        part.sync()
        compile_s = time.perf_counter() - start
    if variant == "bf16_graph":
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):  # warm up on a side stream before capture, as CUDA graphs require
                net(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = net(static_x)

        def run():
            graph.replay()
            return static_out
    else:

        def run():
            with torch.no_grad():
                return net(x)

    times, out = _timed(part, run, s["infer_repeats"])
    ref = _REFERENCE[key]
    diff = float((out.float() - ref).abs().max())
    span = float(ref.max() - ref.min())
    ms = statistics.median(times) / batch
    result = {"ms_per_img": round(ms, 3), "img_per_s": round(1e3 / ms, 1), "max_abs_dab": diff}
    result["rel_dab"] = diff / span if span else None
    if part.cuda:
        result["peak_mib"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**20, 1)
    if compile_s is not None:
        result["compile_s"] = round(compile_s, 1)
    return result


def part_train(part: Part) -> None:
    s = part.settings
    bench_train = _load_bench_module("train")
    dataset = _dataset(part)
    for variant in s["train_variants"]:
        base = dict(kind="train", size=s["train_size"], batch=s["train_batch"], path=variant)
        if part.left() < 15:
            part.row(**base, error="skipped: part deadline")
            continue
        overrides = [
            *s["train_preset"], "model.pretrained=null", f"data.size={s['train_size']}", "data.val_fraction=0",
            "data.min_colorfulness=0", f"train.device={part.device}", f"train.batch_size={s['train_batch']}",
            "train.checkpoint_every=1000000", "train.log_every=1000000", "train.seed=0", *bench_train.VARIANTS[variant],
        ]  # fmt: skip
        spec = {
            "overrides": overrides, "dataset": dataset, "out": str(part.out / "work" / f"train-{variant}"),
            "device": part.device, "warmup": s["train_warmup"], "steps": s["train_steps"],
            "workers": s["train_workers"], "threads": 0,
        }  # fmt: skip
        start = time.perf_counter()
        res = bench_train.run_worker(spec, max(5.0, part.left() - 5))
        wall = time.perf_counter() - start
        if "error" in res:
            part.row(**base, error=res["error"], wall_s=round(wall, 1))
            continue
        timed = res["step_ms"][s["train_warmup"] :]
        ms = statistics.median(timed)
        part.row(
            **base, ms_per_step=round(ms, 1), img_per_s=round(s["train_batch"] * 1e3 / ms, 2),
            peak_mib=round(res["peak_mib"], 1) if res.get("peak_mib") is not None else None,
            warmup_ms=[round(m) for m in res["step_ms"][: s["train_warmup"]]], wall_s=round(wall, 1),
        )  # fmt: skip


def part_loader(part: Part) -> None:
    from ddcolor.config import DataConfig
    from ddcolor.data.loader import build_dataloader

    s = part.settings
    dataset = _dataset(part)
    cfg = DataConfig(size=s["train_size"], val_fraction=0.0, min_colorfulness=0.0, seed=0)
    for workers in s["loader_workers"]:
        loader = build_dataloader(
            cfg, dataset, "train", batch_size=s["train_batch"], num_workers=workers, pin_memory=part.cuda
        )
        best = 0.0
        for epoch in range(3):
            loader.set_epoch(epoch)
            start, n = time.perf_counter(), 0
            for batch in loader:
                if part.cuda:
                    batch["gray_rgb"].to(part.device, non_blocking=True)
                n += batch["gray_rgb"].shape[0]
            part.sync()
            best = max(best, n / (time.perf_counter() - start))
        part.row(kind="loader", workers=workers, batch=s["train_batch"], size=s["train_size"], img_per_s=round(best, 1))


def part_learn(part: Part) -> None:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from ddcolor.color import gray_rgb_from_l, lab_to_rgb, rgb_to_lab
    from ddcolor.colorize import Colorizer
    from ddcolor.config import load_config
    from ddcolor.data.ingest import ingest
    from ddcolor.data.prepare import prepare_image
    from ddcolor.model.checkpoint import load_model
    from ddcolor.train import train
    from tests.training import test_learning as tl  # the held-out-block protocol of the CPU learning test

    s = part.settings
    size, work = s["learn_size"], part.out / "work" / "learn"
    rng = np.random.default_rng(0)
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    photos, held_out = tl._photos(), []
    for p, photo in enumerate(photos):
        blocks, chosen = tl._blocks(photo, rng)
        hidden = [blocks[i] for i in chosen]
        for c, crop in enumerate(tl._train_crops(photo, hidden, rng)):
            Image.fromarray(np.ascontiguousarray(crop)).save(raw / f"p{p}_c{c:03d}.png")
        for top, left, bottom, right in hidden:
            side = min(bottom - top, right - left)
            y, x = top + (bottom - top - side) // 2, left + (right - left - side) // 2
            held_out.append(prepare_image(photo[y : y + side, x : x + side], size, "center_crop"))
    base = [o for o in tl.CONFIG if not o.startswith(("model.", "data.size", "train.device", "train.batch_size"))]
    base = [o for o in base if not o.startswith(("train.max_steps", "train.log_every"))]
    common = [*base, *s["learn_config"], "model.pretrained=null", f"data.size={size}", f"train.device={part.device}",
              f"train.batch_size={s['learn_batch']}", "train.log_every=1000000"]  # fmt: skip
    if part.cuda:
        common.append("train.amp=bf16")
    config = load_config(None, [*common, "train.max_steps=20"])
    ingest(str(raw), str(work / "shards"), config, num_workers=0)
    steps = 5  # smoke: the code path only
    if s["learn_seconds"]:  # calibrate: 20 steps, then as many as fit in learn_seconds (at least 5)
        start = time.perf_counter()
        train(config, str(work / "shards"), out_dir=work / "calibrate", progress=False, image_every=0)
        per_step = (time.perf_counter() - start) / 20
        steps = max(5, min(int(s["learn_seconds"] / per_step), int((part.left() - 30) / per_step)))
    milestones = f"train.milestones=[{int(steps * 0.7)},{int(steps * 0.9)}]"
    config = load_config(None, [*common, f"train.max_steps={steps}", milestones])
    start = time.perf_counter()
    result = train(config, str(work / "shards"), out_dir=work / "run", progress=False, image_every=0)
    seconds = time.perf_counter() - start
    model = load_model(result.checkpoint_path).to(part.device)
    gt = np.stack(held_out)
    lab = rgb_to_lab(torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 255.0)
    l_gt, ab_gt = lab[:, :1], lab[:, 1:]
    with torch.inference_mode():
        ab_pred = model(gray_rgb_from_l(l_gt).to(part.device)).float().clamp(-128, 127).cpu()
    colorized = Colorizer(model, input_size=size, device=part.device, batch_size=16).colorize_batch(held_out)
    gray = tl._uint8(lab_to_rgb(torch.cat([l_gt, torch.zeros_like(ab_gt)], dim=1)))
    part.row(
        kind="learn", steps=steps, batch=s["learn_batch"], size=size, train_s=round(seconds, 1),
        train_crops=len(list(raw.glob("*.png"))), held_out=len(held_out),
        ab_l1_model=round(float((ab_pred - ab_gt).abs().mean()), 3), ab_l1_gray=round(float(ab_gt.abs().mean()), 3),
        psnr_model=round(float(np.mean([tl._psnr(o, r) for o, r in zip(colorized, gt, strict=True)])), 2),
        psnr_gray=round(float(np.mean([tl._psnr(o, r) for o, r in zip(gray, gt, strict=True)])), 2),
    )  # fmt: skip


def part_colorize(part: Part) -> None:
    import torch

    from ddcolor.data.samples import write_samples
    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    s = part.settings
    work = part.out / "work" / "colorize"
    write_samples(str(work / "in"), count=s["colorize_images"])
    preset, overrides = s["colorize_model"]
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model(preset, pretrained=None, **overrides), work / "model.safetensors")
    ddcolor = Path(sys.executable).with_name("ddcolor")
    cmd = [str(ddcolor) if ddcolor.exists() else sys.executable, *([] if ddcolor.exists() else ["-m", "ddcolor.cli"])]
    cmd += ["colorize", str(work / "in"), "-o", str(work / "out"), "--model", str(checkpoint), "--device",
            "cuda" if part.cuda else "cpu", "--precision", "bf16", "--batch-size", str(s["colorize_batch"]),
            "--input-size", str(s["colorize_size"]), "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, part.left() - 2), check=False)
    wall = time.perf_counter() - start
    written = len(list((work / "out").rglob("*.*"))) if (work / "out").exists() else 0
    row = dict(kind="colorize", images=s["colorize_images"], input_size=s["colorize_size"], written=written)
    row.update(exit_code=proc.returncode, wall_s=round(wall, 2), img_per_s=round(written / wall, 2))
    if proc.returncode:
        row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
    part.row(**row)


def part_pytest(part: Part) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *part.settings["pytest_args"]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, part.left() - 2))
        code, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        code, out = "timeout", (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    (part.out / "pytest_cuda.txt").write_text(out)
    summary = next((line for line in reversed(out.splitlines()) if line.strip()), "no output")  # "8 skipped in 9 s"
    part.row(kind="pytest", command=" ".join(cmd[1:]), exit_code=code, summary=summary.strip("= "),
             wall_s=round(time.perf_counter() - start, 1))  # fmt: skip


# --- parent ----------------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e5) else f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return "" if value is None else str(value).replace("|", "/")


def write_report(out: Path, status: dict, meta: dict) -> None:
    """results.json (everything) and results.md (a table per part, plus ratios to the fp32 rows)."""
    rows = {part: _read_rows(out / f"{part}.jsonl") for part in status}
    for row in rows.get("train", []):
        fp32 = next((r for r in rows["train"] if r["path"] == "fp32" and "img_per_s" in r), None)
        if fp32 and "img_per_s" in row:
            row["vs_fp32"] = f"{row['img_per_s'] / fp32['img_per_s']:.2f}x"
    (out / "results.json").write_text(json.dumps({"meta": meta, "status": status, "rows": rows}, indent=1))
    lines = [f"# GPU check ({meta['device']}{', smoke' if meta['smoke'] else ''})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    for part, part_rows in rows.items():
        lines += ["", f"## {part}: {status[part]}", ""]
        if not part_rows:
            lines.append("(no rows)")
            continue
        keys: list[str] = []
        for row in part_rows:
            keys += [k for k in row if k not in keys and k != "kind"]
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in part_rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def run_part(name: str, spec: dict, timeout: float) -> str:
    spec = {**spec, "part": name, "deadline": time.time() + timeout}
    log = Path(spec["out"]) / f"{name}.log"
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                [sys.executable, __file__, "--part-spec", json.dumps(spec)],
                stdout=fh, stderr=subprocess.STDOUT, timeout=timeout + 15, check=False, cwd=ROOT,
            )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s (rows so far kept)"
    if proc.returncode:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["no output"]
        return f"failed (exit {proc.returncode}): {tail[0][:160]}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for results.json, results.md and per-part files")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {list(PARTS)}")
    parser.add_argument("--budget", type=float, default=1.0, help="multiply every part's time limit")
    parser.add_argument("--part-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part_spec:
        spec = json.loads(args.part_spec)
        part = Part(spec)
        try:
            globals()[f"part_{spec['part']}"](part)
        except Exception:
            traceback.print_exc()
            part.row(kind="error", error=traceback.format_exc().strip().splitlines()[-1][:300])
            return 1
        return 0
    if args.out is None:
        parser.error("OUT_DIR is required")
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu --smoke to check the script)")
    args.out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        (args.out / f"{part}.jsonl").unlink(missing_ok=True)
    meta = {
        "device": args.device,
        "smoke": args.smoke,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    spec = {"out": str(args.out), "device": args.device, "smoke": args.smoke}
    status = dict.fromkeys(parts, "pending")
    started = time.perf_counter()
    for part in parts:
        limit = PART_SECONDS[part] * args.budget * (3 if args.smoke and part in ("learn", "pytest") else 1)
        print(f"# {part} (limit {limit:.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        status[part] = run_part(part, spec, limit)
        print(f"#   {part}: {status[part]} in {time.perf_counter() - t0:.0f} s", flush=True)
        meta["elapsed_s"] = round(time.perf_counter() - started, 1)
        write_report(args.out, status, meta)
    print(f"# wrote {args.out / 'results.md'} and results.json in {meta['elapsed_s']} s")
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
