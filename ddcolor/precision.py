"""Precision chosen by the hardware: ``auto`` = bf16 where it is native and fast, fp32 elsewhere.

bf16 is fast only where the hardware multiplies bf16 natively: CUDA GPUs of compute capability 8.0+ (Ampere and
later) and x86 CPUs with ``avx512_bf16`` (Cooper Lake, Zen 4+) or ``amx_bf16`` (Sapphire Rapids+). Anywhere else
PyTorch emulates it: on a 2-core AVX2 EPYC a 1024x1024 matmul ran at 0.7 GFLOP/s in bf16 against 57.9 in fp32
(80x slower). So:

* ``auto`` resolves to ``bf16`` on such a GPU or CPU, else ``fp32`` (MPS: fp32). The decision comes from the
  CPU's flags (``/proc/cpuinfo``); where there are none (macOS, other OSes) or on a non-x86 CPU that says it has
  bf16, a matmul micro-benchmark of a few milliseconds decides. It is made once per device and process, logged
  once, and the trainer records it in the MLflow params as ``train.amp_resolved``.
* an explicit ``bf16`` on a CPU without native bf16 still runs, with one warning that gives the measured
  slowdown (a small matmul timed in fp32 and in bf16).

Names: inference code says ``fp32 | bf16 | fp16`` (`resolve_precision`); the training config says
``train.amp: none | bf16 | fp16`` (`resolve_amp`). Both accept ``auto``.

Example::

    from ddcolor.precision import resolve_precision, cpu_capability
    resolve_precision("auto", "cpu")   # "bf16" on an AMX Xeon, "fp32" on an AVX2 laptop
    cpu_capability()                   # "AMX" | "AVX-512-BF16" | "AVX-512" | "AVX2" | ...
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

__all__ = [
    "AMP_CHOICES",
    "PRECISIONS",
    "bf16_slowdown",
    "cpu_capability",
    "cpu_flags",
    "device_description",
    "native_bf16",
    "reset",
    "resolve_amp",
    "resolve_precision",
]

log = logging.getLogger(__name__)

#: Inference precisions (``--precision``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Training mixed-precision modes (``train.amp``); none = fp32.
AMP_CHOICES = ("auto", "none", "bf16", "fp16")

_X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # either one gives PyTorch (oneDNN) a native bf16 GEMM
_BENCH_SIDE = 128  # px of the square matmul the micro-benchmark times: ~4 MFLOP, well under 1 ms in fp32
_BENCH_MIN_SPEEDUP = 1.0  # without flags: bf16 must be at least as fast as fp32 to be chosen

_choices: dict[str, str] = {}  # device key -> "bf16" | "fp32": the per-process cache of `auto`
_warned: set[str] = set()  # device keys already warned about a slow explicit bf16


def reset() -> None:
    """Forget the cached decisions, warnings and CPU flags (tests that fake another machine)."""
    _choices.clear()
    _warned.clear()
    _read_cpu_flags.cache_clear()
    _slowdown.cache_clear()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``); empty where unreadable."""
    return _read_cpu_flags()


@functools.cache
def _read_cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


_X86_LEVELS = ("AVX2", "AVX-512", "AVX-512-BF16", "AMX")  # ascending; the last two have native bf16


def _onednn_cap() -> int | None:
    """The level ``ONEDNN_MAX_CPU_ISA`` caps oneDNN (PyTorch's CPU GEMM backend) to, as an index of `_X86_LEVELS`;
    None when unset. Capping to AVX2 is how an AMX machine behaves like an AVX2 one (and how auto is tested)."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if isa in ("", "ALL", "DEFAULT"):
        return None
    if "AMX" in isa:
        return 3
    if "BF16" in isa or "FP16" in isa or "AVX10" in isa:
        return 2
    if "AVX512" in isa:
        return 1
    return 0  # AVX2, AVX2_VNNI, AVX, SSE41: no native bf16 (and below AVX2 we still say AVX2: no finer level)


def cpu_capability() -> str:
    """The CPU's best matmul capability in words: ``AMX``, ``AVX-512-BF16``, ``AVX-512``, ``AVX2`` (lowered to what
    ``ONEDNN_MAX_CPU_ISA`` allows, if set); elsewhere PyTorch's own name (``torch.backends.cpu.get_cpu_capability()``,
    e.g. ``SVE256``, ``DEFAULT``) plus the architecture, with ``+BF16`` when an ARM CPU reports bf16."""
    flags = cpu_flags()
    level = next(
        (i for i, need in ((3, "amx_bf16"), (2, "avx512_bf16"), (1, "avx512f"), (0, "avx2")) if need in flags), None
    )
    if level is not None:
        cap = _onednn_cap()
        return _X86_LEVELS[level] if cap is None or cap >= level else f"{_X86_LEVELS[cap]} (ONEDNN_MAX_CPU_ISA)"
    torch_name = torch.backends.cpu.get_cpu_capability()
    name = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch_name, f"{platform.machine()} {torch_name}")
    return name + ("+BF16" if "bf16" in flags else "")


def device_description(device: str | torch.device = "cpu") -> str:
    """What a precision choice depends on, for logs and benchmark lines: ``CPU AMX`` or ``GPU NVIDIA H100 (sm90)``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"GPU {torch.cuda.get_device_name(index)} (sm{major}{minor})"
    if device.type == "mps":
        return "GPU Apple MPS"
    return f"CPU {cpu_capability()}"


def _time_matmul(dtype: torch.dtype, side: int = _BENCH_SIDE, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one ``side`` x ``side`` CPU matmul in ``dtype`` (after one warm-up), on one
    thread: on a busy machine a multi-threaded BLAS call waits for a descheduled thread (tens of ms), which would
    measure the load, not the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(side, side).to(dtype)
        b = torch.randn(side, side).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best


@functools.cache
def _slowdown() -> tuple[float, float, float]:
    fp32, bf16 = _time_matmul(torch.float32), _time_matmul(torch.bfloat16)
    return bf16 / max(fp32, 1e-9), fp32 * 1e3, bf16 * 1e3


def bf16_slowdown() -> tuple[float, float, float]:
    """``(bf16 time / fp32 time, fp32 ms, bf16 ms)`` of a 128x128 CPU matmul, measured once per process (~ms)."""
    return _slowdown()


def _key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 natively (fast), and why, in words.

    CUDA: compute capability 8.0 or newer. CPU: x86 ``amx_bf16`` / ``avx512_bf16`` flag; an ARM CPU with the
    ``bf16`` feature, or a CPU whose flags cannot be read, only when a bf16 matmul is at least as fast as fp32
    (micro-benchmark). MPS and anything else: no.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(_key(device))
        return major >= 8, f"compute capability {major}.{minor} ({'>=' if major >= 8 else '<'} 8.0 for bf16)"
    if device.type != "cpu":
        return False, f"{device.type}: bf16 not used"
    flags = cpu_flags()
    found = [flag for flag in _X86_BF16_FLAGS if flag in flags]
    cap = _onednn_cap()
    if found and (cap is None or cap >= 2):
        return True, f"{found[0]} in the CPU flags"
    if found:
        return False, f"{found[0]} in the CPU flags, but ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}"
    if "avx2" in flags or "avx512f" in flags:
        return False, "no avx512_bf16 / amx_bf16 in the CPU flags"
    ratio, fp32_ms, bf16_ms = bf16_slowdown()  # no x86 flags to go by: measure
    why = f"128x128 matmul: bf16 {bf16_ms:.2f} ms vs fp32 {fp32_ms:.2f} ms"
    return ratio <= 1.0 / _BENCH_MIN_SPEEDUP, why


def _auto(device: torch.device) -> str:
    key = _key(device)
    if key not in _choices:
        native, why = native_bf16(device)
        _choices[key] = "bf16" if native else "fp32"
        log.info("precision auto -> %s on %s (%s: %s)", _choices[key], key, device_description(device), why)
    return _choices[key]


def _warn_slow_bf16(device: torch.device) -> None:
    """One warning per process and device when bf16 was asked for on a CPU without native bf16."""
    if device.type != "cpu" or "cpu" in _warned or native_bf16(device)[0]:
        return
    _warned.add("cpu")
    ratio, fp32_ms, bf16_ms = bf16_slowdown()
    log.warning(
        "bf16 on this CPU (%s, no avx512_bf16 / amx_bf16) is emulated: measured %.1fx slower than fp32 "
        "(128x128 matmul: %.2f ms bf16 vs %.2f ms fp32). It still runs; use precision auto or fp32 "
        "(train.amp=auto|none, --precision auto|fp32) to go at full speed.",
        cpu_capability(),
        ratio,
        bf16_ms,
        fp32_ms,
    )


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto | fp32 | bf16 | fp16`` -> the precision to run on ``device``: ``fp32 | bf16 | fp16``.

    ``auto`` is bf16 where `native_bf16`, else fp32 (decided once per device and process, and logged). An explicit
    ``bf16`` on a CPU without native bf16 is kept, with one warning giving the measured slowdown.

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        return _auto(device)
    if precision == "bf16":
        _warn_slow_bf16(device)
    return precision


def resolve_amp(amp: str, device: str | torch.device = "cpu") -> str:
    """``train.amp`` (``auto | none | bf16 | fp16``) -> ``none | bf16 | fp16`` for ``device`` (see
    `resolve_precision`; none = fp32).

    Raises:
        ValueError: an unknown mode.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"train.amp must be one of {AMP_CHOICES}, got {amp!r}")
    resolved = resolve_precision("fp32" if amp == "none" else amp, device)
    return "none" if resolved == "fp32" else resolved
