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

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flows/ is not part of the installed package

from conftest import free_port, make_random_images

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
    mp.undo()


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
    from test_ingest import _content

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
    assert _content(str(tmp_path / engine)) == _content(str(tmp_path / "local"))


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
