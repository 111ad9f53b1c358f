"""The `train-ddcolor` Prefect flow against a temporary Prefect server (`prefect_test_harness`): final states
(promoted, skipped, not promoted, failed validation), artifacts, the MLflow <-> Prefect cross-tags, and the ingest
fan-out over a task runner (`ingest_task_runner`).

Same tiny recipe as tests/integration/test_pipeline.py (whole runs of ~30 s on 2 CPU cores). MLflow: a SQLite store
in a tmp folder through MLFLOW_TRACKING_URI (the flow reads endpoints from the environment only).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ddcolor.data.samples import write_samples
from tests.helpers.data import dataset_content, poison_a_row
from tests.helpers.images import make_random_images
from tests.helpers.recipes import TINY_IMAGES, tiny_recipe

pytestmark = pytest.mark.slow


def sections(root: Path, name: str, **extra: dict) -> dict[str, dict]:
    """The tiny recipe as flow parameters (``{"train": {...}}``), data under ``root``, registered model ``name``."""
    params = tiny_recipe(
        data={"source": str(root / "raw"), "shards_uri": str(root / "shards")},
        registry={"model_name": name, "experiment_name": name},
    )
    for section, values in extra.items():
        params.setdefault(section, {}).update(values)
    return params


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-flows') / 'mlflow.db'}"


@pytest.fixture
def flow(prefect_server, tracking_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    from flows.train_ddcolor import train_ddcolor

    return train_ddcolor


def _mlflow(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key or f"{a.type}-{a.id}": a for a in found}


def _flow_run(flow_run_id):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_flow_promotes_then_skips_then_does_not_promote_a_worse_model(flow, tmp_path, tracking_uri):
    params = sections(tmp_path, "flow-a")
    write_samples(params["data"]["source"], TINY_IMAGES)
    work = str(tmp_path / "work")

    state = flow(config_path=None, work_dir=work, **params, return_state=True)
    assert state.is_completed() and state.message.startswith("promoted: flow-a v1"), state.message
    result = state.result()
    assert result["status"] == "promoted" and result["model_version"] == "1" and Path(result["grid"]).is_file()
    flow_run_id = state.state_details.flow_run_id
    run = _mlflow(tracking_uri).get_run(result["run_id"])
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    assert run.data.tags["prefect.flow_run_name"] == _flow_run(flow_run_id).name
    assert f"mlflow_run_id:{result['run_id']}" in _flow_run(flow_run_id).tags
    artifacts = _artifacts(flow_run_id)
    assert {"train-ddcolor-summary", "train-ddcolor-sample-grid"} <= set(artifacts)
    summary = artifacts["train-ddcolor-summary"].data
    assert "promoted" in summary and result["dataset"]["manifest_sha256"] in summary and "Gate PASSED" in summary
    assert str(Path(result["grid"]).resolve()) in artifacts["train-ddcolor-sample-grid"].data  # local MLflow: a path
    assert "train-ddcolor-mlflow-run" not in artifacts  # a link only for an HTTP MLflow server
    gates = artifacts["train-ddcolor-gates"]
    assert gates.type == "table" and '"metric": "psnr"' in gates.data  # every metric, gated or not
    progress = [a for a in artifacts.values() if a.type == "progress"]
    assert len(progress) == 1 and float(progress[0].data) == 100.0  # updated at each log step, ended at the last
    # one name for the flow run, the MLflow run and the output folder: train-<preset>-<time>-<fingerprint[:8]>
    name = _flow_run(flow_run_id).name
    assert name.startswith("train-atto-") and name.endswith("-" + result["fingerprint"][:8]), name
    assert run.info.run_name == name and (Path(work) / "runs" / name / "model.safetensors").is_file()

    skipped = flow(config_path=None, work_dir=work, **params, return_state=True)
    assert skipped.is_completed() and skipped.message.startswith("skipped:"), skipped.message
    assert skipped.result()["run_id"] is None and skipped.result()["champion_version"] == "1"
    assert "train-ddcolor-summary" in _artifacts(skipped.state_details.flow_run_id)

    # gates are not part of the fingerprint, so an impossible gate needs force to retrain at all
    impossible = sections(tmp_path, "flow-a", gates={"min_psnr": 1000.0})
    worse = flow(config_path=None, work_dir=work, force=True, **impossible, return_state=True)
    assert worse.is_completed() and worse.message.startswith("not promoted: gate failed"), worse.message
    assert "psnr" in worse.message and worse.result()["status"] == "not_promoted"
    assert worse.result()["model_version"] == "2" and worse.result()["champion_version"] == "1"
    champion = _mlflow(tracking_uri).get_model_version_by_alias("flow-a", "champion")
    assert str(champion.version) == "1"


def test_flow_fails_at_validation_for_a_poisoned_dataset(flow, tmp_path, tracking_uri):
    from ddcolor.config import load_config
    from ddcolor.pipeline import ingest_step

    params = sections(tmp_path, "flow-poisoned")
    write_samples(params["data"]["source"], TINY_IMAGES)
    ingest_step(load_config(None, {f"data.{k}": v for k, v in params["data"].items()}))
    poison_a_row(Path(params["data"]["shards_uri"]))

    state = flow(config_path=None, work_dir=str(tmp_path / "work"), **params, return_state=True)
    assert state.is_failed() and "failed validation" in state.message, state.message
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert "FAILED" in artifacts["train-ddcolor-validation"].data
    assert "validation failed" in artifacts["train-ddcolor-summary"].data
    assert _mlflow(tracking_uri).search_model_versions("name='flow-poisoned'") == []
    assert os.environ["MLFLOW_TRACKING_URI"] == tracking_uri


def test_flow_stopped_by_a_signal_ends_cancelled_with_the_trainers_line(flow, tmp_path, monkeypatch):
    """SIGTERM during training (Prefect cancellation, eviction): the trainer checkpoints and raises TrainingStopped;
    the train task and the flow end Cancelled with its one line (the real signal path is tested in test_train)."""
    import signal

    from ddcolor import pipeline
    from ddcolor.train import TrainingStopped

    def stopped(*args, **kwargs):
        raise TrainingStopped(4, signal.SIGTERM, str(tmp_path / "checkpoints" / "step_00000004"))

    monkeypatch.setattr(pipeline, "train_step", stopped)
    params = sections(tmp_path, "flow-stopped")
    write_samples(params["data"]["source"], TINY_IMAGES)
    state = flow(config_path=None, work_dir=str(tmp_path / "work"), **params, return_state=True)
    assert state.is_cancelled(), (state.type, state.message)
    assert state.message.startswith("stopped at step 4; resume with --resume") and "step_00000004" in state.message


def _ingest_only(source: str, dest: str, ingest_task_runner: str | None):
    """The flow's ingest task alone, in a flow run (as in `train_ddcolor`), into ``dest``."""
    from ddcolor.config import load_config
    from flows.train_ddcolor import ingest_task

    overrides = {"data.size": 64, "data.shards_uri": dest, "data.val_fraction": 0.3, "data.shard_rows": 4}
    return ingest_task(load_config(None, {**overrides, "data.num_workers": 0}), source, ingest_task_runner)


def test_ingest_fans_out_on_the_process_task_runner_with_the_same_dataset(prefect_server, tmp_path, monkeypatch):
    """ingest_task_runner='process': one hash-batch task run per batch of 3 files and one write-shard task run per
    shard, in the spawned processes of the built-in ProcessPoolTaskRunner; the dataset (rows, splits, shards,
    quarantine) equals the local pool's. The same with 'thread'."""
    from prefect import flow as prefect_flow
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ddcolor.data import ingest as ingest_module

    raw = tmp_path / "raw"
    first, *_ = make_random_images(raw, 10)
    (raw / "copy.png").write_bytes(first.read_bytes())
    (raw / "broken.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(ingest_module, "MAP_BATCH", 3)  # 12 inputs: 4 hash-batch tasks
    ingest_only = prefect_flow(_ingest_only, name="ingest-only")

    local = ingest_only(str(raw), str(tmp_path / "local"), None, return_state=True)
    fanned = ingest_only(str(raw), str(tmp_path / "fanned"), "process", return_state=True)
    assert local.is_completed() and fanned.is_completed(), fanned.message
    assert fanned.result() == local.result() == {"ingested": 10, "duplicates": 1, "total_rows": 10}
    assert dataset_content(str(tmp_path / "fanned")) == dataset_content(str(tmp_path / "local"))
    (entry,) = ingest_module.load_quarantine(str(tmp_path / "fanned"))
    assert entry["source_uri"] == str(raw / "broken.jpg") and entry["reason"].startswith("not an image")

    def task_runs(state) -> list:
        flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        with get_client(sync_client=True) as client:
            return client.read_task_runs(flow_run_filter=flow_runs)

    def named(state, prefix: str) -> list:
        return [r for r in task_runs(state) if r.name.startswith(prefix)]

    hashed, shards = named(fanned, "hash-batch"), named(fanned, "write-shard")
    assert len(hashed) == 4 and len(shards) == 3  # 11 unique files (the broken one too), data.shard_rows = 4
    assert all(r.state.is_completed() for r in hashed + shards)
    assert not named(local, "hash-batch") and not named(local, "write-shard")

    threaded = ingest_only(str(raw), str(tmp_path / "threaded"), "thread", return_state=True)  # in this process
    assert threaded.is_completed() and dataset_content(str(tmp_path / "threaded")) == dataset_content(
        str(tmp_path / "local")
    )
    assert (len(named(threaded, "hash-batch")), len(named(threaded, "write-shard"))) == (4, 3)


def test_unknown_ingest_task_runner_fails_the_flow_before_any_work(flow, tmp_path):
    params = sections(tmp_path, "flow-bad-runner")
    state = flow(
        config_path=None, work_dir=str(tmp_path / "work"), ingest_task_runner="spark", **params, return_state=True
    )
    assert state.is_failed() and "ingest_task_runner='spark' is not a task runner" in state.message, state.message
    assert "dask://host:port" in state.message and not Path(params["data"]["shards_uri"]).exists()


@pytest.mark.parametrize(
    ("spec", "package"),
    [("dask", "prefect-dask"), ("dask://sched:8786", "prefect-dask"), ("ray://head:10001", "prefect-ray")],
)
def test_dask_and_ray_runners_need_their_package(spec, package, monkeypatch):
    from flows.train_ddcolor import build_ingest_task_runner

    module = package.replace("-", "_")
    monkeypatch.setitem(sys.modules, module, None)  # not importable, even where it is installed
    with pytest.raises(ImportError, match=f"pip install {package}"):
        build_ingest_task_runner(spec)


def test_ingest_task_runner_names(monkeypatch):
    from types import SimpleNamespace

    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from flows.train_ddcolor import build_ingest_task_runner

    assert isinstance(build_ingest_task_runner("thread"), ThreadPoolTaskRunner)
    assert isinstance(build_ingest_task_runner("process"), ProcessPoolTaskRunner)
    fake = SimpleNamespace(DaskTaskRunner=lambda address=None: ("dask", address))
    monkeypatch.setitem(sys.modules, "prefect_dask", fake)  # stands in for prefect-dask: what it is given
    assert build_ingest_task_runner("dask") == ("dask", None)
    assert build_ingest_task_runner("dask://sched:8786") == ("dask", "tcp://sched:8786")
    monkeypatch.setitem(sys.modules, "prefect_ray", SimpleNamespace(RayTaskRunner=lambda address=None: address))
    assert build_ingest_task_runner("ray://head:10001") == "ray://head:10001"
    for bad in ("spark", "dask://", "process://x", "Thread", ""):
        with pytest.raises(ValueError, match="not a task runner; use one of thread, process, dask"):
            build_ingest_task_runner(bad)


def test_a_rerun_after_a_late_failure_reuses_the_finished_training(flow, tmp_path, tracking_uri, monkeypatch):
    """promote hangs past its timeout_seconds: the run fails after training. The re-run finds the training persisted
    under the same fingerprint and goes on from there: one training, one MLflow run, then promoted."""
    import time

    from ddcolor import pipeline

    trainings = []
    real_train, real_promote = pipeline.train_step, pipeline.promote_step

    def counted(*args, **kwargs):
        trainings.append(kwargs.get("run_name"))
        return real_train(*args, **kwargs)

    def hangs(*args, **kwargs):
        for _ in range(600):  # 60 s in short sleeps, so the task's timeout can interrupt it
            time.sleep(0.1)
        raise AssertionError("promote was not stopped by its timeout")

    monkeypatch.setattr(pipeline, "train_step", counted)
    monkeypatch.setattr(pipeline, "promote_step", hangs)
    params = sections(tmp_path, "flow-rerun")
    write_samples(params["data"]["source"], TINY_IMAGES)
    work = str(tmp_path / "work")
    failed = flow(config_path=None, work_dir=work, timeouts={"promote": 3}, **params, return_state=True)
    assert failed.is_failed() and "timeout" in failed.message.lower(), failed.message
    assert len(trainings) == 1

    monkeypatch.setattr(pipeline, "promote_step", real_promote)
    again = flow(config_path=None, work_dir=work, **params, return_state=True)
    assert again.is_completed() and again.result()["status"] == "promoted", again.message
    assert len(trainings) == 1  # not trained again
    runs = _mlflow(tracking_uri).search_runs([_mlflow(tracking_uri).get_experiment_by_name("flow-rerun").experiment_id])
    assert [r.info.run_id for r in runs] == [again.result()["run_id"]]


def test_unknown_timeout_key_fails_before_any_work(flow, tmp_path):
    params = sections(tmp_path, "flow-timeouts")
    state = flow(config_path=None, work_dir=str(tmp_path / "work"), timeouts={"train": 5}, **params, return_state=True)
    assert state.is_failed() and "timeouts: unknown task(s) ['train']" in state.message, state.message
    assert not (tmp_path / "shards").exists()
