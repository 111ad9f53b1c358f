"""`bench/compile.py --smoke`: runs to the end and reports sane numbers (slow: the compiled variants spend about two
minutes compiling on 2 CPU cores). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
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
