"""Inference benchmark: eager DDColor vs `prepare_for_inference` (fp32, bf16, auto) vs onnxruntime.

    python bench/infer.py [--presets tiny,large] [--sizes 256,512] [--repeats 5] [--variants eager,fp32,bf16,auto,onnx]

``auto`` is the default precision of colorize / evaluate / the playground (`ddcolor.precision`): bf16 where the
machine has native bf16, else fp32; the table says what it resolved to and how it compares with the better of fp32
and bf16 (target: at most 1.1x slower). Every row names the machine kind (AVX2 / AVX-512 / AVX-512-BF16 / AMX CPU,
or the GPU): the bf16 / fp32 ratio depends on it.

One run uses one set of random-init weights per preset (saved once as a checkpoint that every variant loads,
and exported once to ONNX), so the ab differences compare the same function. Prints, per preset and size:
ms/image (median of --repeats after one warm-up), speedup over eager, peak memory, max abs and relative
(to the eager ab range) difference of ab to eager, and the fp32 roofline.

Peak memory: each variant runs in a fresh subprocess. CPU: after the model is loaded and prepared, freed heap
memory is returned to the OS (glibc malloc_trim), the process's resident-set high-water mark is reset
(`/proc/self/clear_refs` = 5, Linux), and the reported figure is VmHWM - VmRSS over the warm-up and timed
runs: everything inference adds on top of the loaded weights (activations, allocator caches, oneDNN
scratch). Where clear_refs is unavailable it falls back to the `getrusage` max-RSS delta (an underestimate
when loading peaked higher). CUDA: torch's max_memory_allocated delta (onnxruntime: n/a).

Roofline: model FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls and the
CPU SDPA kernel; 1 multiply-add = 2 FLOPs) for the eager and the prepared network, divided by this
machine's measured fp32 (and bf16) GEMM rate from a large matmul.

Not a test: nothing here asserts. Large at 512 on a 2-core CPU takes minutes per variant; pick presets.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from procstats import machine, reset_peak_rss, status_kib

VARIANTS = ("eager", "fp32", "bf16", "auto", "fp16", "onnx")
SEED = 0


# --- worker (one variant, one fresh process) -------------------------------------------------------------
def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so the baseline RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bench_input(batch: int, size: int) -> torch.Tensor:
    """Deterministic gray RGB (R = G = B), smooth plus noise, in [0, 1]."""
    generator = torch.Generator().manual_seed(SEED)
    coarse = torch.rand(batch, 1, size // 16, size // 16, generator=generator)
    gray = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    gray = (gray + 0.05 * torch.rand(batch, 1, size, size, generator=generator)).clamp(0, 1)
    return gray.expand(-1, 3, -1, -1).contiguous()


def worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    x = _bench_input(spec["batch"], spec["size"])
    variant = spec["variant"]
    if variant == "onnx":
        from ddcolor.export import OnnxColorModel

        providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        net = OnnxColorModel(spec["onnx"], providers=providers, intra_op_threads=spec["threads"] or None)
    else:
        from ddcolor.model import prepare_for_inference
        from ddcolor.model.checkpoint import load_checkpoint
        from ddcolor.precision import resolve_precision

        model = load_checkpoint(spec["checkpoint"]).eval().to(device)
        resolved = resolve_precision(variant, device) if variant == "auto" else variant
        net = model if variant == "eager" else prepare_for_inference(model, resolved)
        if net is not model:
            del model
    x = x.to(device)
    gc.collect()
    _trim_heap()

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = net(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = status_kib("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = reset_peak_rss()
    start = time.perf_counter()
    out = run()  # warm-up (oneDNN primitive creation, onnxruntime allocations)
    warmup_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        out = run()
        times.append((time.perf_counter() - start) * 1e3)
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20 if variant != "onnx" else float("nan")
        method = "cuda max_memory_allocated"
    elif reset and base is not None:
        peak_mib = (status_kib("VmHWM") - base) / 1024
        method = "VmHWM-VmRSS after clear_refs"
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024
        method = "ru_maxrss delta"
    np.save(spec["out"], out.float().cpu().numpy())
    return {
        "times_ms": times,
        "warmup_ms": warmup_ms,
        "peak_mib": peak_mib,
        "memory_method": method,
        "threads": torch.get_num_threads(),
        "resolved": resolved if variant not in ("eager", "onnx") else variant,
    }


# --- parent -------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def gemm_rate(
    dtype: torch.dtype, device: torch.device, n: int = 4096, repeats: int = 5, budget_s: float = 1.0
) -> float:
    """Best-of GFLOP/s of an n x n x n matmul; n is halved (down to 512) until one multiply takes about ``budget_s``
    or less, so that emulated bf16 (30-80x slower without avx512_bf16 / AMX) does not take minutes."""
    probe = torch.randn(512, 512, device=device).to(dtype)
    probe @ probe
    start = time.perf_counter()
    probe @ probe
    if device.type == "cuda":
        torch.cuda.synchronize()
    probe_rate = 2 * 512**3 / max(time.perf_counter() - start, 1e-9)
    while n > 512 and 2 * n**3 / probe_rate > budget_s:
        n //= 2
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_gflops(module: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    module.requires_grad_(False)  # FlopCounterMode's module tracker needs grad mode on (no no_grad here)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        module(x)
    return counter.get_total_flops() / 1e9


def run_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['variant']} {spec['size']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,large", help="comma-separated presets (atto, tiny, large)")
    parser.add_argument("--sizes", default="256,512", help="comma-separated square input sizes (multiples of 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant after one warm-up")
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--variants", default="eager,fp32,bf16,auto,onnx", help=f"comma-separated from {VARIANTS}")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available, and cpu)")
    parser.add_argument("--threads", type=int, default=0, help="torch / onnxruntime threads (0: their default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from ddcolor.export import export_onnx
    from ddcolor.model import build_model, prepare_for_inference
    from ddcolor.model.checkpoint import save_checkpoint

    presets = [p for p in args.presets.split(",") if p]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "eager" not in variants:
        variants.insert(0, "eager")
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else [args.device]
    devices = ["cpu" if d == "auto" else d for d in devices]

    import onnxruntime

    flags = cpu_flags()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if f in flags]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {machine('cpu')}, torch threads {torch.get_num_threads()}")
    print(
        f"# torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}; ISA flags: "
        f"{' '.join(isa)}), onnxruntime {onnxruntime.__version__}, python {platform.python_version()}"
    )
    rates = {}
    for device in devices:
        dev = torch.device(device)
        rates[device] = {dt: gemm_rate(dt, dev) for dt in (torch.float32, torch.bfloat16)}
        print(
            f"# {device} GEMM (up to 4096^3): fp32 {rates[device][torch.float32]:.0f} GFLOP/s, "
            f"bf16 {rates[device][torch.bfloat16]:.0f} GFLOP/s"
        )
    print(f"# batch {args.batch}, {args.repeats} timed runs after 1 warm-up, median; peak memory: see docstring")

    rows = []
    with tempfile.TemporaryDirectory(prefix="ddcolor-bench-") as tmp:
        tmp = Path(tmp)
        for preset in presets:
            torch.manual_seed(SEED)
            model = build_model(preset, pretrained=None).eval()
            checkpoint = save_checkpoint(model, tmp / f"{preset}.safetensors")
            onnx_path = None
            if "onnx" in variants:
                start = time.perf_counter()
                onnx_path = export_onnx(model, tmp / f"{preset}.onnx")
                print(
                    f"# {preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; "
                    f"ONNX export {time.perf_counter() - start:.1f} s"
                )
            for size in sizes:
                x = _bench_input(1, size)
                flops = {"eager": count_gflops(model, x), "prepared": count_gflops(prepare_for_inference(model), x)}
                for device in devices:
                    results, outputs = {}, {}
                    for variant in variants:
                        if variant == "fp16" and device == "cpu" and "avx512_fp16" not in flags:
                            continue
                        out = tmp / f"{preset}-{size}-{device}-{variant}.npy"
                        spec = {
                            "variant": variant, "size": size, "batch": args.batch, "repeats": args.repeats,
                            "device": device, "threads": args.threads, "checkpoint": str(checkpoint),
                            "onnx": str(onnx_path), "out": str(out),
                        }  # fmt: skip
                        results[variant] = run_worker(spec)
                        outputs[variant] = np.load(out)
                    ref = outputs["eager"]
                    span = float(ref.max() - ref.min())
                    eager_ms = statistics.median(results["eager"]["times_ms"]) / args.batch
                    for variant, res in results.items():
                        ms = statistics.median(res["times_ms"]) / args.batch
                        diff = float(np.abs(outputs[variant] - ref).max())
                        gflop = flops["eager"] if variant == "eager" else flops["prepared"]
                        low = res["resolved"] in ("bf16", "fp16")
                        rate = rates[device][torch.bfloat16 if low else torch.float32]
                        rows.append({
                            "preset": preset, "size": size, "device": device, "variant": variant, "ms": ms,
                            "machine": machine(device), "resolved": res["resolved"],
                            "speedup": eager_ms / ms, "peak_mib": res["peak_mib"] / args.batch, "max_abs": diff,
                            "rel": diff / span if span else float("nan"), "gflop": gflop,
                            "roofline_ms": gflop / rate * 1e3, "memory_method": res["memory_method"],
                        })  # fmt: skip
                        r = rows[-1]
                        print(
                            f"#   {preset} {size} {device} {variant}: {ms:.1f} ms/img, x{r['speedup']:.2f}, "
                            f"peak +{r['peak_mib']:.0f} MiB, max|d ab| {diff:.2e}",
                            flush=True,
                        )
    print()
    print(
        "| machine | preset | size | path | ms/image | speedup vs eager | peak MiB | max abs Δab | rel Δab "
        "| GFLOP | roofline ms | % of roofline |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"eager": "eager (DDColor.eval)", "fp32": "prepared fp32", "bf16": "prepared bf16",
             "fp16": "prepared fp16", "onnx": "onnxruntime fp32"}  # fmt: skip
    for r in rows:
        name = f"prepared auto (-> {r['resolved']})" if r["variant"] == "auto" else names[r["variant"]]
        print(
            f"| {r['machine']} | {r['preset']} | {r['size']} | {name} | {r['ms']:.1f} "
            f"| {r['speedup']:.2f}x | {r['peak_mib']:.0f} | {r['max_abs']:.1e} | {r['rel']:.1e} | {r['gflop']:.1f} "
            f"| {r['roofline_ms']:.1f} | {100 * r['roofline_ms'] / r['ms']:.0f}% |"
        )
    print()
    print(
        "roofline: GFLOP / measured GEMM rate (fp32 rate for eager, prepared fp32 and onnxruntime; bf16 rate for"
        " bf16/fp16); GFLOP counted on the eager module for eager, on the prepared fp32 module otherwise."
    )
    print(f"peak MiB: {rows[0]['memory_method'] if rows else ''} (per image), in a fresh process per variant.")
    for r in rows:
        if r["variant"] != "auto":
            continue
        same = {
            x["variant"]: x["ms"]
            for x in rows
            if (x["preset"], x["size"], x["device"]) == (r["preset"], r["size"], r["device"])
        }
        best = min((same[v], v) for v in ("fp32", "bf16") if v in same) if {"fp32", "bf16"} & set(same) else None
        if best:
            print(
                f"auto vs the better of fp32/bf16 ({best[1]}), {r['preset']} {r['size']} on {r['machine']}: "
                f"{r['ms'] / best[0]:.2f}x the time (target <= 1.1x)"
            )


if __name__ == "__main__":
    main()
