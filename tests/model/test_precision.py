"""`auto` precision: bf16 only where the hardware has it natively, decided once, logged once; a slow explicit bf16
warns once with the measured slowdown. Machines are faked by patching the CPU flags / CUDA capability."""

from __future__ import annotations

import logging

import pytest
import torch

from ddcolor import precision as P

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # e.g. a 2-core AMD EPYC cloud VM
AVX512 = AVX2 | {"avx512f", "avx512bw"}  # Skylake-X: AVX-512 without bf16
AMX = AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"}  # Sapphire Rapids


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # a capped CI runner must not change the fakes below
        monkeypatch.delenv(name, raising=False)
    P.reset()
    yield
    P.reset()


def fake_cpu(monkeypatch, flags, fp32_s=1e-3, bf16_s=80e-3):
    """Pretend to be a CPU with ``flags`` whose 128x128 matmul takes ``fp32_s`` / ``bf16_s`` seconds."""
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset(flags))
    timings = {torch.float32: fp32_s, torch.bfloat16: bf16_s}
    monkeypatch.setattr(P, "_time_matmul", lambda dtype, *a, **k: timings[dtype])


@pytest.mark.parametrize(
    ("flags", "capability", "expected"),
    [(AVX2, "AVX2", "fp32"), (AVX512, "AVX-512", "fp32"), (AVX512 | {"avx512_bf16"}, "AVX-512-BF16", "bf16"),
     (AMX, "AMX", "bf16")],
)  # fmt: skip
def test_auto_follows_the_cpu_flags(monkeypatch, flags, capability, expected):
    fake_cpu(monkeypatch, flags)
    assert P.cpu_capability() == capability
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.resolve_amp("auto", "cpu") == {"fp32": "none", "bf16": "bf16"}[expected]


def test_explicit_choices_are_kept(monkeypatch):
    fake_cpu(monkeypatch, AMX)
    assert [P.resolve_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert [P.resolve_amp(a, "cpu") for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("int8", "cpu")
    with pytest.raises(ValueError, match=r"train\.amp must be one of"):
        P.resolve_amp("fp32", "cpu")


def test_the_choice_is_cached_and_logged_once(monkeypatch, caplog):
    fake_cpu(monkeypatch, AMX)
    with caplog.at_level(logging.INFO, logger="ddcolor.precision"):
        assert {P.resolve_precision("auto", "cpu") for _ in range(3)} == {"bf16"}
        fake_cpu(monkeypatch, AVX2)  # the same process: the first decision stands
        assert P.resolve_amp("auto", "cpu") == "bf16"
    lines = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(lines) == 1 and "bf16" in lines[0] and "CPU AMX" in lines[0] and "amx_bf16" in lines[0]
    P.reset()
    assert P.resolve_precision("auto", "cpu") == "fp32"


def test_explicit_bf16_without_native_support_warns_once_with_the_slowdown(monkeypatch, caplog):
    fake_cpu(monkeypatch, AVX2, fp32_s=0.5e-3, bf16_s=40e-3)
    with caplog.at_level(logging.WARNING, logger="ddcolor.precision"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"  # still runs
        assert P.resolve_amp("bf16", "cpu") == "bf16"
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "80.0x slower than fp32" in warnings[0] and "40.00 ms bf16 vs 0.50 ms fp32" in warnings[0]
    assert "AVX2" in warnings[0]


def test_no_warning_where_bf16_is_native(monkeypatch, caplog):
    fake_cpu(monkeypatch, AMX)
    with caplog.at_level(logging.WARNING, logger="ddcolor.precision"):
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_slowdown_is_really_measured():
    ratio, fp32_ms, bf16_ms = P.bf16_slowdown()
    assert fp32_ms > 0 and bf16_ms > 0 and ratio == pytest.approx(bf16_ms / fp32_ms)


@pytest.mark.parametrize(("fp32_s", "bf16_s", "expected"), [(1e-3, 0.5e-3, "bf16"), (1e-3, 30e-3, "fp32")])
def test_without_x86_flags_a_micro_benchmark_decides(monkeypatch, fp32_s, bf16_s, expected):
    fake_cpu(monkeypatch, {"fp", "asimd", "bf16"}, fp32_s=fp32_s, bf16_s=bf16_s)  # e.g. an ARM server
    assert P.resolve_precision("auto", "cpu") == expected
    assert P.cpu_capability().endswith("+BF16")


@pytest.mark.parametrize(("capability", "expected"), [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    assert P.resolve_precision("auto", "cuda:0") == expected
    assert P.device_description("cuda:0") == f"GPU Fake GPU (sm{capability[0]}{capability[1]})"


def test_mps_stays_fp32():
    assert P.resolve_precision("auto", "mps") == "fp32"


def test_a_onednn_isa_cap_below_bf16_means_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes an AMX machine multiply like an AVX2 one: auto must follow the cap."""
    fake_cpu(monkeypatch, AMX)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert P.cpu_capability() == "AVX2 (ONEDNN_MAX_CPU_ISA)"
    assert P.resolve_precision("auto", "cpu") == "fp32"
    P.reset()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert P.cpu_capability() == "AMX" and P.resolve_precision("auto", "cpu") == "bf16"
