"""Scale-out on real engines: ingestion and colorize-archive on a Dask cluster (``dask scheduler`` + ``dask worker``
processes started in another folder, so nothing but the installed package is importable there) and on a local Ray.

Each cluster test compares against the local run: the same dataset rows (bytes), splits, shards and quarantine; the
same colorized files. Slow (a Prefect test server, a cluster start): marked ``slow``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.data import dataset_content
from tests.helpers.images import make_random_images
from tests.helpers.outputs import assert_same_outputs, colorize_reference
from tests.helpers.servers import free_port

VENV_BIN = Path(sys.executable).parent


class DaskCluster:
    """``dask scheduler`` + ``dask worker --nworkers 2`` as subprocesses on 127.0.0.1, run from ``cwd`` (not the
    checkout) with no PYTHONPATH: the workers can import the installed ``ddcolor`` and nothing from ``flows/``."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cwd, self.env = cwd, {k: v for k, v in {**os.environ, **(env or {})}.items() if k != "PYTHONPATH"}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> DaskCluster:
        log = open(self.cwd / "dask.log", "ab")  # noqa: SIM115 - closed with the processes
        common = {"cwd": self.cwd, "env": self.env, "stdout": log, "stderr": subprocess.STDOUT}
        self.procs.append(
            subprocess.Popen(
                [VENV_BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
                **common,
            )
        )
        worker = [VENV_BIN / "dask", "worker", f"tcp://{self.address}", "--nworkers", "2", "--nthreads", "1"]
        self.procs.append(subprocess.Popen([*worker, "--no-dashboard", "--memory-limit", "2GiB"], **common))
        from distributed import Client

        with Client(f"tcp://{self.address}", timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        return self

    def worker_pids(self) -> list[int]:
        from distributed import Client

        with Client(f"tcp://{self.address}", timeout=30) as client:
            return list(client.run(os.getpid).values())

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    cluster = DaskCluster(tmp_path_factory.mktemp("dask-cwd")).start()
    yield cluster
    cluster.stop()


def _ingest_flow():
    from prefect import flow

    from ddcolor.config import load_config
    from flows.train_ddcolor import ingest_task

    @flow(name="ingest-only")
    def ingest_only(source: str, dest: str, runner: str | None):
        overrides = {"data.size": 64, "data.shards_uri": dest, "data.val_fraction": 0.3, "data.shard_rows": 4}
        return ingest_task(load_config(None, {**overrides, "data.num_workers": 0}), source, runner)

    return ingest_only


@pytest.fixture(scope="module")
def raw_images(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    first, *_ = make_random_images(raw, 8)
    (raw / "copy.png").write_bytes(first.read_bytes())
    (raw / "broken.jpg").write_bytes(b"not an image")
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["dask", "ray"])
def test_ingest_on_a_real_cluster_equals_the_local_ingest(engine, prefect_server, raw_images, tmp_path, request):
    """The flow's ingest task with ingest_task_runner=dask://127.0.0.1:PORT (workers without `flows`) or ray (a local
    Ray with 2 CPUs): the same rows, byte for byte, splits, shards and quarantine as the local pool."""

    from ddcolor.data import ingest as ingest_module

    runner = f"dask://{request.getfixturevalue('dask_cluster').address}" if engine == "dask" else "ray"
    if engine == "ray":
        os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    ingest_only = _ingest_flow()
    local = ingest_only(str(raw_images), str(tmp_path / "local"), None, return_state=True)
    previous = ingest_module.MAP_BATCH
    ingest_module.MAP_BATCH = 3  # 10 inputs: 4 batches over 2 workers
    try:
        remote = ingest_only(str(raw_images), str(tmp_path / engine), runner, return_state=True)
    finally:
        ingest_module.MAP_BATCH = previous
    assert local.is_completed() and remote.is_completed(), remote.message
    assert remote.result() == local.result() == {"ingested": 8, "duplicates": 1, "total_rows": 8}
    assert dataset_content(str(tmp_path / engine)) == dataset_content(str(tmp_path / "local"))


def test_a_flow_module_outside_the_package_is_pickled_by_value(tmp_path, monkeypatch):
    """What Prefect sends to Dask/Ray with each task holds the flow; a flow file under flows/ must travel by value,
    since a cluster worker has only the installed package."""
    import cloudpickle

    from ddcolor import fanout

    module_dir = tmp_path / "userflows"
    module_dir.mkdir()
    (module_dir / "myflow.py").write_text("def my_flow():\n    return 'ran'\n")
    monkeypatch.syspath_prepend(str(module_dir))
    import myflow

    by_reference = cloudpickle.dumps(myflow.my_flow)
    fanout.pickle_flow_module_by_value("myflow")
    by_value = cloudpickle.dumps(myflow.my_flow)
    try:
        monkeypatch.delitem(sys.modules, "myflow")
        monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(module_dir)])
        with pytest.raises(ModuleNotFoundError, match="myflow"):
            pickle.loads(by_reference)
        assert pickle.loads(by_value)() == "ran"  # the worker needs no copy of the file
    finally:
        cloudpickle.unregister_pickle_by_value(myflow)
        fanout._BY_VALUE.discard("myflow")


def test_task_runner_specs():
    from ddcolor.fanout import parse_task_runner

    assert parse_task_runner("dask://h:8786") == ("dask", "h:8786")
    assert parse_task_runner("ray") == ("ray", "")
    assert parse_task_runner("process") == ("process", "")
    for bad in ("spark", "ray://", "thread://x", ""):
        with pytest.raises(ValueError, match="use one of thread, process, dask"):
            parse_task_runner(bad)


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


# --- colorize-archive on the clusters -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive_case(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(source folder: 6 images + 1 broken file, the `ddcolor colorize` outputs of it, the model checkpoint)."""

    from ddcolor.colorize import random_init_model
    from ddcolor.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("archive")
    make_random_images(root / "src", 6)
    (root / "src" / "broken.png").write_bytes(b"not an image")
    model = save_checkpoint(random_init_model("atto", 0, warn=False), root / "model.safetensors")
    colorize_reference(root / "src", root / "ref", model, None)
    return root / "src", root / "ref", model


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["process", "dask", "ray"])
def test_colorize_archive_flow_on_each_runner_equals_colorize(engine, prefect_server, archive_case, tmp_path, request):
    """The colorize-archive flow on the process pool, the Dask cluster (workers without `flows`) and a local Ray:
    outputs equal `ddcolor colorize`; the manifest accounts for the broken file; progress and summary artifacts."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from ddcolor.archive import ColorizeSettings, colorize_archive, read_manifest
    from flows.colorize_archive import ARTIFACT_KEYS, colorize_archive_flow

    src, ref, model = archive_case
    runner = f"dask://{request.getfixturevalue('dask_cluster').address}" if engine == "dask" else engine
    kwargs = {"input_size": 64, "precision": "fp32", "device": "cpu", "batch_size": 2, "workers": 2}
    state = colorize_archive_flow(str(src), str(tmp_path / "out"), str(model), runner, return_state=True, **kwargs)
    assert state.is_completed(), state.message
    assert state.result()["done"] == 6 and state.result()["failed"] == 1, state.result()
    assert_same_outputs(tmp_path / "out", ref)
    (broken,) = [r for r in read_manifest(str(tmp_path / "out")) if r["status"] == "failed"]
    assert broken["input"].endswith("broken.png") and "not an image" in broken["reason"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert (
        "| 7 | 6 | 0 | 1 |" in by_key[ARTIFACT_KEYS["summary"]].data
        and "broken.png" in by_key["colorize-archive-summary"].data
    )
    assert float(by_key[ARTIFACT_KEYS["progress"]].data) == 100.0
    # the markers the cluster's workers wrote make a rerun (here in this process) skip every finished file
    again = colorize_archive(
        src, tmp_path / "out", str(model), settings=ColorizeSettings(64, precision="fp32"), workers=0
    )
    assert (again.skipped, again.done, len(again.failed)) == (6, 0, 1)


def test_colorize_archive_deployment_runs_on_the_dask_cluster_of_infra():
    """prefect.yaml's colorize-archive: its entrypoint exists, its task runner is the Dask scheduler Service of
    infra/k8s/dask.yaml (listed in the kustomization), on the k8s pool the GPU deployment uses."""
    import yaml

    from ddcolor.fanout import parse_task_runner

    root = Path(__file__).resolve().parents[2]
    deployments = {d["name"]: d for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]}
    archive = deployments["colorize-archive"]
    path, _, function = archive["entrypoint"].partition(":")
    assert f"def {function}(" in (root / path).read_text()
    kind, address = parse_task_runner(archive["parameters"]["task_runner"])
    docs = list(yaml.safe_load_all((root / "infra/k8s/dask.yaml").read_text()))
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert kind == "dask" and address == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert "dask.yaml" in (root / "infra/k8s/kustomization.yaml").read_text()
    assert archive["work_pool"]["name"] == deployments["k8s-gpu"]["work_pool"]["name"]
    assert set(archive["work_pool"]["job_variables"]) <= set(deployments["k8s-gpu"]["work_pool"]["job_variables"])


# --- what a fan-out job carries -----------------------------------------------------------------------------


def test_ingest_jobs_hold_no_credential_and_do_not_grow_with_the_dataset(tmp_path, monkeypatch):
    """Every job handed to the mapper (hash and shard jobs), pickled as Dask/Ray pickle it: no AWS secret inside,
    and the same size whether the dataset holds 10 rows or 20; rows already in the dataset are still found (the
    hash index), and what comes back to the driver stays far under 1 KB per image."""
    import cloudpickle

    from ddcolor.config import DataConfig
    from ddcolor.data.ingest import ingest

    secret = "s3cr3t-" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-test-key-id")
    cfg = DataConfig(size=64, shard_rows=4, val_fraction=0.3)
    payloads: list[tuple[str, bytes]] = []
    returned: list[int] = []

    def recording(fn, jobs):
        for job in jobs:
            payloads.append((fn.__name__, cloudpickle.dumps((fn, job))))
            result = fn(job)
            returned.append(len(cloudpickle.dumps(result)))
            yield result

    make_random_images(tmp_path / "a", 10)
    first = ingest(tmp_path / "a", tmp_path / "ds", cfg, map_batches=recording, batch_size=5)
    n_first = len(payloads)
    make_random_images(tmp_path / "a", 10, start_seed=5000)
    second = ingest(tmp_path / "a", tmp_path / "ds", cfg, map_batches=recording, batch_size=5)
    assert (first.ingested, second.ingested, second.duplicates) == (10, 10, 10), (first.summary(), second.summary())
    assert payloads and not [p for _, p in payloads if secret.encode() in p or b"AKIA-test-key-id" in p]
    hash_sizes = lambda run: [len(p) for name, p in run if name == "hash_batch"]  # noqa: E731
    first_run, second_run = hash_sizes(payloads[:n_first]), hash_sizes(payloads[n_first:])
    assert len(second_run) == 4 and max(second_run) < 1024, second_run
    # 10 more rows in the dataset: the job gained the index URI (tens of bytes), not 10 hashes x 32 bytes
    assert max(second_run) - max(first_run) < 120, (first_run, second_run)
    # the driver's traffic per image: jobs out + results back (pickled), everything included
    per_image = (sum(len(p) for _, p in payloads) + sum(returned)) / (20 + 20)
    assert per_image < 1024, per_image


def test_hash_index_file_is_written_once_per_content(tmp_path):
    from ddcolor.data.hash_index import HashIndex, load_hash_index, write_hash_index

    hashes = [os.urandom(32).hex() for _ in range(100)]
    relative = write_hash_index(str(tmp_path), HashIndex.from_hex(hashes))
    assert write_hash_index(str(tmp_path), HashIndex.from_hex(reversed(hashes))) == relative  # same set, same file
    assert (tmp_path / relative).stat().st_size == 32 * 100
    index = load_hash_index(str(tmp_path / relative))
    assert all(h in index for h in hashes) and os.urandom(32).hex() not in index
    evens = HashIndex(np.sort(np.array([bytes.fromhex(f"{i:064x}") for i in range(0, 2000, 2)], dtype="S32")))
    assert f"{1000:064x}" in evens and f"{1001:064x}" not in evens and "ff" * 32 not in evens


def test_gc_removes_old_orphans_and_hash_indexes_never_a_listed_shard(tmp_path):
    import shutil

    from ddcolor.config import DataConfig
    from ddcolor.data.gc import collect_garbage
    from ddcolor.data.hash_index import HashIndex, write_hash_index
    from ddcolor.data.ingest import ingest, load_manifest, shard_uris

    make_random_images(tmp_path / "src", 6)
    dest = str(tmp_path / "ds")
    ingest(tmp_path / "src", dest, DataConfig(size=64, shard_rows=4, val_fraction=0.3), num_workers=0)
    listed = shard_uris(dest)
    current_index = str(Path(dest) / load_manifest(dest)["hash_index"])
    orphan = Path(dest) / "shards" / "part-00099-deadbeef.parquet"  # as a crashed run leaves it
    shutil.copy(listed[0], orphan)
    index = str(Path(dest) / write_hash_index(dest, HashIndex.from_hex(["ab" * 32])))  # an older version's

    young = collect_garbage(dest)  # default grace 24 h: a running ingest's files are kept
    assert young.removed == [] and sorted(young.kept_young) == sorted([str(orphan), index])
    dry = collect_garbage(dest, grace_s=0, dry_run=True)
    assert sorted(dry.removed) == sorted([str(orphan), index]) and orphan.exists()
    done = collect_garbage(dest, grace_s=0)
    assert sorted(done.removed) == sorted([str(orphan), index]) and not orphan.exists() and not Path(index).exists()
    assert all(Path(u).is_file() for u in listed) and shard_uris(dest) == listed and load_manifest(dest)
    assert Path(current_index).is_file()  # the index the manifest names stays


@pytest.mark.slow
def test_a_dask_worker_killed_mid_ingest_loses_nothing(prefect_server, raw_images, tmp_path):
    """SIGKILL one of two Dask worker processes while the ingest's jobs run on them (one file per hash job, two
    rows per shard): Dask reruns what the dead worker held on the other one (the nanny restarts it), every job is
    idempotent, and the dataset equals the local ingest's, byte for byte; nothing lost, nothing doubled."""
    import signal

    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from ddcolor import fanout
    from ddcolor.config import DataConfig
    from ddcolor.data.ingest import ingest

    cfg = DataConfig(size=64, shard_rows=2, val_fraction=0.3, num_workers=0)
    local = ingest(raw_images, tmp_path / "local", cfg)
    cluster = DaskCluster(tmp_path).start()
    killed: list[int] = []
    address = f"tcp://{cluster.address}"  # the flow is pickled with each task: it must not hold the cluster object
    try:
        victim = cluster.worker_pids()[0]

        def kill_after_two(done: int, total: int) -> None:
            if done == 2 and not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        @flow(name="ingest-with-a-kill")
        def run(dest: str):
            mapper = fanout.TaskRunnerMapper(DaskTaskRunner(address=address), retries=2, on_result=kill_after_two)
            return ingest(raw_images, dest, cfg, map_batches=mapper, batch_size=1)

        report = run(str(tmp_path / "dask"))
        assert killed and victim not in cluster.worker_pids()  # it died (the nanny started a new process)
    finally:
        cluster.stop()
    assert report.balanced and (report.ingested, report.duplicates, len(report.quarantined)) == (
        local.ingested,
        local.duplicates,
        len(local.quarantined),
    )
    assert dataset_content(str(tmp_path / "dask")) == dataset_content(str(tmp_path / "local"))
