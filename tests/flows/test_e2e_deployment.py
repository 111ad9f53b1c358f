"""End to end: the `train-ddcolor` deployment from ``prefect.yaml`` on real local services (loopback only).

Processes: a moto S3 server (conftest ``s3_server``/``s3_env``), an ``mlflow server`` on SQLite (helpers
`MlflowServer`, a private instance so the registry starts empty), ``prefect server start`` on SQLite (its own
PREFECT_HOME) and ``prefect worker start --pool ddcolor-process``. The test deploys the repository's ``prefect.yaml``
(deployment ``local``) with the ``prefect`` CLI, triggers it with ``prefect deployment run train-ddcolor/local`` and
follows the flow run through the server's REST API, exactly as a user's shell would:

1. raw sample photos on S3 -> Completed "promoted": MLflow has the training run with ``val/*`` metrics and image
   artifacts, the registry a version with alias ``champion``, Prefect the summary artifact;
2. the same data and parameters again -> Completed "skipped" (no new run, no new version);
3. a poisoned copy of the dataset (one row cut short, manifest re-hashed) -> Failed at validation, nothing
   registered, the champion unchanged.

The scheduler service is off (the weekly cron must not start runs during the test); the schedule is checked as
registered. About 2-3 minutes on 2 CPU cores, most of it the three flow-run processes starting (torch, MLflow).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.data import poison_a_row
from tests.helpers.recipes import tiny_recipe
from tests.helpers.servers import BIN, MlflowServer, PrefectServer, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
FLOW = "train-ddcolor"
DEPLOYMENT = f"{FLOW}/local"
POOL = "ddcolor-process"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
IMAGES = 8

pytestmark = pytest.mark.slow

#: The shared tiny recipe (tests.helpers.recipes) as deployment parameters (sections merged onto params.yaml by the
#: flow).
TINY = tiny_recipe(data={"shard_rows": 4})


# --- processes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow_e2e(tmp_path_factory: pytest.TempPathFactory):
    """A private ``mlflow server`` (SQLite, proxied artifacts): the registry holds only this test's versions."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-e2e"))
    server.start()
    yield server
    server.stop()


def _cli(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _project(dest: Path) -> Path:
    """The files a process worker needs from a checkout (DDCOLOR_HOME): prefect.yaml, flows/, params.yaml."""
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "prefect.yaml", dest / "prefect.yaml")
    shutil.copy2(ROOT / "params.yaml", dest / "params.yaml")
    shutil.copytree(ROOT / "flows", dest / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _run_deployment(server: PrefectServer, env: dict[str, str], cwd: Path, params: dict, timeout: float = 420):
    """`prefect deployment run` with `params`; wait for a terminal state; return the flow run (REST JSON)."""
    out = _cli(env, cwd, "deployment", "run", DEPLOYMENT, "--params", json.dumps(params))
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    run_id = match.group(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = server.api(f"/flow_runs/{run_id}")
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(1.0)
    raise AssertionError(f"flow run {run_id} not finished after {timeout} s: {run['state']}")


def _artifacts(server: PrefectServer, flow_run_id: str) -> dict[str, dict]:
    found = server.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in found if a.get("key")}


def _poison_s3_dataset(uri: str, tmp: Path) -> None:
    """Cut one row short in one shard of the S3 dataset at `uri` and re-hash it in the manifest (well-listed,
    readable, wrong data: only validation can catch it)."""
    from ddcolor import storage

    local = tmp / "poison"
    manifest = json.loads(storage.read_bytes(f"{uri}/manifest.json"))
    (local / "shards").mkdir(parents=True)
    first = sorted(s["path"] for s in manifest["shards"])[0]
    name = first.rsplit("/", 1)[-1]
    (local / "shards" / name).write_bytes(storage.read_bytes(f"{uri}/shards/{name}"))
    (local / "manifest.json").write_text(json.dumps(manifest))
    poison_a_row(local)
    storage.write_bytes(f"{uri}/shards/{name}", (local / "shards" / name).read_bytes())
    storage.write_bytes(f"{uri}/manifest.json", (local / "manifest.json").read_bytes())


@contextlib.contextmanager
def _worker(env: dict[str, str], cwd: Path, log: Path):
    """``prefect worker start --pool ddcolor-process`` (polling every second), stopped with its flow runs on exit."""
    env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    cmd = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process", "--install-policy", "never"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc)


# --- the test ----------------------------------------------------------------------------------------------


def test_deployment_promotes_then_skips_then_stops_a_poisoned_dataset(
    s3_env, prefect_server, mlflow_e2e, tmp_path, monkeypatch
):
    import mlflow

    from ddcolor import storage
    from ddcolor.data.samples import write_samples

    bucket = s3_env
    raw, shards = f"s3://{bucket}/raw", f"s3://{bucket}/shards"
    write_samples(raw, IMAGES)
    repo = _project(tmp_path / "checkout")
    env = prefect_server.env()
    env.update(
        MLFLOW_TRACKING_URI=mlflow_e2e.uri,
        GX_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
    )
    env.pop("DDCOLOR_HOME", None)  # deploying machine: the pull step keeps {{ $DDCOLOR_HOME }} for the worker
    worker_env = {**env, "DDCOLOR_HOME": str(repo)}  # the worker machine's checkout

    # deploy from prefect.yaml; the schedule, the pool and the pull step come from the file
    _cli(env, repo, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    _cli(env, repo, "deploy", "--prefect-file", "prefect.yaml", "--name", "local")
    deployment = prefect_server.api(f"/deployments/name/{DEPLOYMENT}")
    assert deployment["work_pool_name"] == POOL
    assert "{{ $DDCOLOR_HOME }}" in json.dumps(deployment["pull_steps"])  # resolved when a run starts
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [
        s["cron"] for s in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]["schedules"]
    ]
    params = {**TINY, "data": {**TINY["data"], "source": raw, "shards_uri": shards}}
    params["work_dir"] = str(tmp_path / "work")
    client = mlflow.MlflowClient(tracking_uri=mlflow_e2e.uri, registry_uri=mlflow_e2e.uri)

    with _worker(worker_env, tmp_path, tmp_path / "worker.log"):
        # 1. new data: train, evaluate, register, promote
        started = time.monotonic()
        first = _run_deployment(prefect_server, env, repo, params)
        first_s = time.monotonic() - started
        log_tail = (tmp_path / "worker.log").read_text()[-4000:]
        assert first["state"]["type"] == "COMPLETED", f"{first['state']}\n{log_tail}"
        assert first["state"]["message"].startswith("promoted"), first["state"]["message"]
        champion = client.get_model_version_by_alias("ddcolor", "champion")
        assert str(champion.version) == "1"
        run = client.get_run(champion.run_id)
        assert {"val/colorfulness", "val/psnr"} <= set(run.data.metrics) and "train/loss_g" in run.data.metrics
        assert run.data.tags["prefect.flow_run_id"] == first["id"]
        assert f"mlflow_run_id:{champion.run_id}" in prefect_server.api(f"/flow_runs/{first['id']}")["tags"]
        artifacts = [a.path for a in client.list_artifacts(champion.run_id, "eval")]
        artifacts += [a.path for a in client.list_artifacts(champion.run_id, "samples")]
        assert "eval/samples.png" in artifacts and any(p.startswith("samples/") for p in artifacts), artifacts
        summary = _artifacts(prefect_server, first["id"])["train-ddcolor-summary"]["data"]
        assert "promoted" in summary and champion.run_id in summary

        # 2. nothing changed: the scheduled retrain costs an ingest and a validation, no training
        started = time.monotonic()
        second = _run_deployment(prefect_server, env, repo, params)
        second_s = time.monotonic() - started
        assert second["state"]["type"] == "COMPLETED" and second["state"]["message"].startswith("skipped"), second
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert [str(v.version) for v in client.search_model_versions("name='ddcolor'")] == ["1"]

        # 3. a poisoned dataset: Failed at validation, nothing trained or registered, champion unchanged
        poisoned = f"s3://{bucket}/poisoned"
        for uri in storage.list_files(shards):
            storage.write_bytes(poisoned + uri[len(shards) :], storage.read_bytes(uri))
        _poison_s3_dataset(poisoned, tmp_path)
        bad = {**params, "data": {**params["data"], "shards_uri": poisoned}}
        third = _run_deployment(prefect_server, env, repo, bad)
        assert third["state"]["type"] == "FAILED", third["state"]
        assert "failed validation" in third["state"]["message"], third["state"]["message"]
        assert "FAILED" in _artifacts(prefect_server, third["id"])["train-ddcolor-validation"]["data"]
        assert len(client.search_runs([run.info.experiment_id])) == 1
        assert [str(v.version) for v in client.search_model_versions("name='ddcolor'")] == ["1"]
        assert str(client.get_model_version_by_alias("ddcolor", "champion").version) == "1"
    print(f"\nflow runs through the deployment: promote {first_s:.1f} s, skip {second_s:.1f} s")
