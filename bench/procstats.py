"""Process and machine facts shared by the benchmarks: resident-memory readings (Linux /proc) and the CPU name."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (e.g. VmRSS, VmHWM); None where /proc is unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: str = "cpu") -> str:
    """What a benchmark line ran on, kind included: ``CPU AMX: Intel(R) Xeon(R) Processor, 2 logical CPUs`` or
    ``GPU NVIDIA H200 (sm90)``. The CPU kind (AVX2 / AVX-512 / AVX-512-BF16 / AMX) is what decides bf16 vs fp32
    speed (`ddcolor.precision.cpu_capability`), so every table row carries it."""
    import os
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ddcolor.precision import device_description

    if str(device).startswith("cuda") or device == "mps":
        return device_description(device)
    return f"{device_description('cpu')}: {cpu_name()}, {os.cpu_count()} logical CPUs"
