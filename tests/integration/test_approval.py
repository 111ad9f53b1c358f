"""Human approval (gates.require_approval): the real train-ddcolor flow on a real `prefect server` pauses after a
passing gate; no answer -> Completed "not promoted: approval timed out"; `ddcolor approve VERSION` -> promoted, with
approver, time and comment on the version. Tiny random-init recipe, SQLite MLflow."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from ddcolor.config import load_config
from ddcolor.data.samples import write_samples
from tests.helpers.recipes import TINY_RECIPE, dotted
from tests.helpers.servers import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
RUN_FLOW = """
import sys
from flows.train_ddcolor import train_ddcolor
state = train_ddcolor(config_path=sys.argv[1], work_dir=sys.argv[2], colorize=False, force=True, return_state=True)
print("STATE", state.type.value, state.message, flush=True)
"""


def _params(tmp_path: Path, timeout_hours: float) -> Path:
    cfg = load_config(
        None,
        {
            **dotted(TINY_RECIPE),
            "data.source": str(tmp_path / "raw"),
            "data.shards_uri": str(tmp_path / "shards"),
            "registry.model_name": "approval",
            "registry.experiment_name": "approval",
            "gates.require_approval": True,
            "gates.approval_timeout_hours": timeout_hours,
        },
    )
    path = tmp_path / f"params-{timeout_hours}.yaml"
    path.write_text(cfg.to_yaml())
    return path


@pytest.mark.slow
def test_flow_waits_for_approval_times_out_then_is_approved(tmp_path):
    server = PrefectServer(tmp_path / "prefect-home")
    server.start()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**server.env(), "MLFLOW_TRACKING_URI": uri, "PREFECT_LOGGING_LEVEL": "WARNING"}
    write_samples(tmp_path / "raw", 8)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    flow = [sys.executable, "-c", RUN_FLOW]
    try:
        # nobody answers within 0.001 h (4 s): Completed, not promoted, no champion
        first = subprocess.run(
            [*flow, str(_params(tmp_path, 0.001)), str(tmp_path / "work")], env=env, cwd=ROOT, capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        assert "STATE COMPLETED not promoted: approval timed out after 0.001 h" in first.stdout, first.stderr[-3000:]
        v1 = client.get_model_version("approval", "1")
        assert v1.tags["approval.status"] == "timed_out" and "challenger" in v1.aliases and "champion" not in v1.aliases

        # the second run pauses; `ddcolor approve 2` answers it and the champion moves
        proc = subprocess.Popen(
            [*flow, str(_params(tmp_path, 1.0)), str(tmp_path / "work")], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 900
        paused = False
        while not paused and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            try:
                run_id = client.get_model_version("approval", "2").tags.get("approval.flow_run_id")
            except Exception:
                continue
            paused = bool(run_id) and server.api(f"/flow_runs/{run_id}")["state"]["type"] == "PAUSED"
        assert paused, proc.communicate(timeout=60)
        assert "champion" not in client.get_model_version("approval", "2").aliases  # @challenger meanwhile
        ddcolor = str(Path(sys.executable).with_name("ddcolor"))
        answer = subprocess.run(
            [ddcolor, "approve", "2", "--comment", "colors look right", "--by", "alice", "--config",
             str(_params(tmp_path, 1.0))], env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert answer.returncode == 0 and "approved: flow run" in answer.stdout, answer.stderr
        out, err = proc.communicate(timeout=600)
        assert "STATE COMPLETED" in out and "is the new @champion, approved by alice" in out, err[-3000:]
        v2 = client.get_model_version("approval", "2")
        assert "champion" in v2.aliases and v2.tags["approval.status"] == "approved"
        assert v2.tags["approval.by"] == "alice" and v2.tags["approval.comment"] == "colors look right"
        assert v2.tags["approval.at"].startswith("20") and "- status: approved" in v2.tags["model_card"]
        again = subprocess.run(
            [ddcolor, "approve", "2", "--config", str(_params(tmp_path, 1.0))], env=env, capture_output=True, text=True
        )
        assert again.returncode == 1 and "not awaiting approval" in again.stderr
    finally:
        server.stop()
