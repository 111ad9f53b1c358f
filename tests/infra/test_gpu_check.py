"""`bench/gpu_check.py --device cpu --smoke`: the prepared GPU check runs end to end here, part by part.

Tiny sizes (timm's ``test_convnext`` with a small decoder, 64 px), so that when a GPU is lent the only unknown is
the GPU. Checks the files the GPU run will leave (per-part JSON lines, results.json, results.md), that every part
finished, and that the numbers are numbers: prepared fp32 equals eager fp32, training images/s are positive,
the CUDA-marked tests collect and skip. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    script = str(ROOT / "bench" / "gpu_check.py")
    proc = subprocess.run(
        [sys.executable, script, str(out), "--device", "cpu", "--smoke", "--budget", "20"],
        capture_output=True, text=True, timeout=3000, check=False, cwd=ROOT,
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == dict.fromkeys(results["status"], "ok"), proc.stdout[-3000:]
    assert proc.returncode == 0
    rows = results["rows"]
    assert set(rows) == {"env", "infer", "train", "loader", "learn", "colorize", "pytest"}
    infer = {(r["batch"], r["path"]): r for r in rows["infer"]}
    assert {path for _, path in infer} == {"eager", "fp32", "bf16", "fp16"}
    assert all("error" not in r for r in infer.values()), infer
    assert infer[(1, "eager")]["max_abs_dab"] == 0 and infer[(1, "fp32")]["max_abs_dab"] < 1e-4
    assert 0 < infer[(1, "bf16")]["rel_dab"] < 0.05
    train = {r["path"]: r for r in rows["train"]}
    assert set(train) == {"fp32", "bf16", "bf16_cl"} and all(r["img_per_s"] > 0 for r in train.values()), train
    assert rows["loader"][0]["img_per_s"] > 0
    learn = rows["learn"][0]
    assert learn["ab_l1_gray"] > 0 and learn["psnr_gray"] > 0 and learn["steps"] >= 5
    colorize = rows["colorize"][0]
    assert colorize["exit_code"] == 0 and colorize["written"] == colorize["images"]
    assert "skipped" in rows["pytest"][0]["summary"] and rows["pytest"][0]["exit_code"] == 0
    md = (out / "results.md").read_text()
    assert "## infer: ok" in md and "| preset |" in md
