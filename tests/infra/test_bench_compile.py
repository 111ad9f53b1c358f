"""`bench/compile.py --smoke` and `bench/official_train.py` at their smallest: both run to the end and report sane
numbers. No timing is asserted. The compile bench is opt-in (``DDCOLOR_TEST_BENCH_COMPILE=1``): its compiled
variants spend about four minutes compiling on 2 CPU cores, and compiled training against eager is already checked
in every `make test` by tests/model/test_compile.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DDCOLOR_TEST_BENCH_COMPILE") != "1",
    reason="set DDCOLOR_TEST_BENCH_COMPILE=1 (runs bench/compile.py --smoke: ~4 min of compilation)",
)
def test_compile_bench_smoke(tmp_path):
    out = tmp_path / "compile.json"
    script = str(ROOT / "bench" / "compile.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--precisions", "fp32", "--json", str(out)],
        capture_output=True, text=True, timeout=1800, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["part"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"train", "infer"}
    for row in rows.values():
        assert row["eager"]["steady_s"] > 0 and row["compiled"]["steady_s"] > 0
        assert row["compiled"]["first_s"] > row["compiled"]["steady_s"]  # the first compiled call compiles
    # same weights, same batches: compiling must not change what is computed (beyond float summation order)
    assert rows["train"]["difference"] < 1e-3
    assert rows["infer"]["difference"] < 1e-4
    assert "| train | test_convnext (smoke) |" in proc.stdout


@pytest.mark.slow
def test_official_train_bench_runs(tmp_path):
    script = str(ROOT / "bench" / "official_train.py")
    proc = subprocess.run(
        [sys.executable, script, "--preset", "atto", "--size", "64", "--batch", "2", "--steps", "1", "--warmup", "1",
         "--images", "8"],
        capture_output=True, text=True, timeout=900, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(times["ours"]) == len(times["official"]) == 1
    assert all(total >= wait >= 0 for runs in times.values() for total, wait in runs)
    assert "| ours |" in proc.stdout and "| official |" in proc.stdout
