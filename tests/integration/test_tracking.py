"""Tracking in MLflow (`ddcolor.tracking`) against a real `mlflow server` process (the `mlflow_server` fixture)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path
from threading import Thread

import numpy as np
import pytest

from ddcolor.config import load_config
from ddcolor.data.version import DatasetVersion
from ddcolor.tracking import MlflowTracker, NullTracker, Tracker, TrackingError, start_tracker
from ddcolor.tracking.pyfunc import input_example
from tests.helpers.servers import free_port

UNREACHABLE = "tracking server unreachable; continuing without tracking (run {} marked in logs)"


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("ddcolor.tracking") and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_null_tracker_does_nothing(tmp_path):
    tracker = start_tracker(load_config(None), enabled=False)
    assert isinstance(tracker, NullTracker)
    assert isinstance(tracker, Tracker)
    assert tracker.run_id is None
    tracker.log_params({"a": 1})
    tracker.set_tags({"b": "c"})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="k", step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    assert tracker.log_model(tmp_path / "missing.safetensors") is None
    tracker.finish()
    tracker.finish("FAILED")
    assert list(tmp_path.iterdir()) == []


def test_import_does_not_load_mlflow():
    code = "import sys, ddcolor.tracking; print('mlflow' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_params_tags_metrics_images_round_trip(mlflow_server, monkeypatch, tmp_path, caplog):
    mlflow_server.start()
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    cfg = load_config(None, overrides={"registry.experiment_name": _experiment(), "train.lr": 3e-4})
    dataset = DatasetVersion(uri="data/shards", manifest_sha256="ab" * 32, dvc_md5=None, rows=12)
    tracker = start_tracker(cfg, run_name="round-trip", tracking_uri=mlflow_server.uri, tags=dataset.as_tags())
    assert isinstance(tracker, MlflowTracker)
    run_id = tracker.run_id
    tracker.log_params({"note": "x" * 10_000})  # longer than MLflow's limit: truncated, not an error
    tracker.set_tags({"stage": "test"})
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 3e-4, "train/images_per_s": 10.0}, step=step)
    for step in (0, 10):
        tracker.log_image(np.full((16, 24, 3), 20 + step, np.uint8), key="val_samples", step=step)
    (tmp_path / "notes.txt").write_text("hello\n")
    tracker.log_artifact(tmp_path / "notes.txt", "extra")
    tracker.log_params({"train.lr": "changed"})  # MLflow refuses to change a param: a warning, no exception
    assert tracker.failed_calls == 1 and tracker.reachable
    assert _warnings(caplog, "log_params failed")
    time.sleep(0.5)  # a few system-metrics samples
    tracker.finish()
    tracker.finish()  # idempotent

    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "round-trip"
    assert run.info.experiment_id == client.get_experiment_by_name(cfg.registry.experiment_name).experiment_id
    params = run.data.params
    flat = cfg.to_flat_dict()
    assert set(flat) <= set(params)
    assert params["train.lr"] == "0.0003"
    assert params["train.betas"] == "[0.9, 0.99]"
    assert params["model.backbone"] == "None"
    assert len(params["note"]) == 6000 and params["note"].endswith("[truncated]")
    tags = run.data.tags
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git.commit"])
    assert tags["git.dirty"] in ("true", "false")
    for name in ("torch", "timm", "ddcolor", "mlflow", "numpy", "python"):
        assert tags[f"version.{name}"]
    assert tags["host"]
    assert tags["dataset.manifest_sha256"] == "ab" * 32
    assert tags["dataset.dvc_md5"] == ""
    assert tags["stage"] == "test"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [m.step for m in client.get_metric_history(run_id, "train/images_per_s")] == list(range(5))
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("val_samples+step+0+" in p and p.endswith(".png") for p in images), images
    assert any("val_samples+step+10+" in p for p in images), images
    assert [a.path for a in client.list_artifacts(run_id, "extra")] == ["extra/notes.txt"]


def test_unreachable_server_at_start_fails_fast():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        MlflowTracker(uri, experiment="never", log_system_metrics=False, timeout_s=2)
    assert time.monotonic() - start < 3
    assert uri in str(err.value)
    assert "unreachable" in str(err.value)


def test_server_rejecting_host_header_names_allowed_hosts():
    class Reject(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"Invalid Host header")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Reject)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://user:secret@127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TrackingError) as err:
            MlflowTracker(uri, log_system_metrics=False, timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()
    message = str(err.value)
    assert "403" in message and "--allowed-hosts" in message
    assert "secret" not in message and "user:***@127.0.0.1" in message


def test_server_dropping_mid_run_does_not_stop_training(mlflow_server, tmp_path, caplog):
    mlflow_server.start()
    experiment = _experiment()
    tracker = MlflowTracker(
        mlflow_server.uri, experiment=experiment, log_system_metrics=False, timeout_s=2, reconnect_every_s=0.2
    )
    other = MlflowTracker(mlflow_server.uri, experiment=experiment, log_system_metrics=False, timeout_s=2)
    tracker.log_metrics({"loss": 1.0}, step=0)
    (tmp_path / "a.txt").write_text("a")

    mlflow_server.stop()
    start = time.monotonic()
    tracker.log_metrics({"loss": 0.9}, step=1)
    tracker.log_params({"late": 1})
    tracker.set_tags({"late": "yes"})
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="val", step=1)
    tracker.log_artifact(tmp_path / "a.txt")
    for step in range(2, 50):
        tracker.log_metrics({"loss": 1.0 / step}, step=step)
    other.finish()  # never raises; the run stays RUNNING on the server
    assert time.monotonic() - start < 10
    assert not tracker.reachable
    assert tracker.dropped_calls == 53
    assert len(_warnings(caplog, UNREACHABLE.format(tracker.run_id))) == 1
    assert _warnings(caplog, f"unreachable; run {other.run_id} left RUNNING")

    mlflow_server.start()
    time.sleep(0.3)  # > reconnect_every_s
    tracker.log_metrics({"loss": 0.1}, step=50)
    assert tracker.reachable
    assert _warnings(caplog, "reachable again")
    tracker.finish()

    client = _client(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [0, 50]
    assert run.data.tags["tracking.dropped_calls"] == "53"
    assert client.get_run(other.run_id).info.status == "RUNNING"
    assert len(_warnings(caplog, UNREACHABLE.format(tracker.run_id))) == 1


def test_log_model_loads_as_pyfunc_with_same_output(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import torch

    from ddcolor.colorize import Colorizer
    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    mlflow_server.start()
    torch.manual_seed(0)
    small = {"nf": 64, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "dec_layers": 1, "num_queries": 8}
    model = build_model("atto", pretrained=None, **small).eval()
    checkpoint = save_checkpoint(model, tmp_path / "final" / "generator", extra={"step": 7})
    tracker = MlflowTracker(mlflow_server.uri, experiment=_experiment(), log_system_metrics=False)
    tracker.log_metrics({"val/psnr": 20.0}, step=7)
    with pytest.raises(FileNotFoundError):
        tracker.log_model(tmp_path / "nowhere.safetensors")
    uri = tracker.log_model(checkpoint.parent)  # a folder with one checkpoint
    tracker.finish()
    assert uri is not None and uri.startswith("models:/m-")

    client = _client(mlflow_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.data.tags["ddcolor.model_uri"] == uri
    assert client.list_artifacts(tracker.run_id) == []  # the checkpoint is stored once: in the LoggedModel below
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.source_run_id == tracker.run_id
    assert logged.experiment_id == run.info.experiment_id
    assert logged.name == "generator"
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "model")))
    assert sorted(p.name for p in (local / "artifacts").iterdir()) == ["generator.json", "generator.safetensors"]
    assert (local / "code" / "ddcolor" / "tracking" / "pyfunc.py").is_file()  # the package travels with the model
    requirements = (local / "requirements.txt").read_text().split()
    assert not [r for r in requirements if r.startswith("ddcolor")]  # no index has it
    for name in ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy"):
        assert f"{name}=={version(name).split('+')[0]}" in requirements
    assert f"mlflow=={version('mlflow')}" in requirements
    # the input example: what `mlflow models serve` accepts, checked as MLflow's docs advise before serving
    served = mlflow.models.validate_serving_input(uri, (local / "serving_input_example.json").read_text())
    example, params = input_example()
    expected = Colorizer(model, input_size=params["input_size"], device="cpu").colorize_batch(list(example))
    assert served.shape == example.shape and served.dtype == np.uint8
    assert np.abs(served.astype(int) - np.stack(expected).astype(int)).max() <= 1

    pyfunc = mlflow.pyfunc.load_model(uri)
    spec = pyfunc.metadata.get_input_schema().inputs[0]
    assert spec.shape == (-1, -1, -1, 3) and spec.type == np.dtype(np.uint8)
    assert pyfunc.metadata.get_output_schema().inputs[0].shape == (-1, -1, -1, 3)
    assert [(p.name, p.default) for p in pyfunc.metadata.get_params_schema().params] == [("input_size", 512)]
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    got = pyfunc.predict(images, params={"input_size": 64})
    expected = Colorizer(model, input_size=64, device="cpu").colorize_batch(list(images))
    assert got.dtype == np.uint8 and got.shape == (2, 40, 56, 3)
    assert np.abs(got.astype(int) - np.stack(expected).astype(int)).max() <= 1
    with pytest.raises(Exception, match=r"dtype|shape"):  # the signature is enforced
        pyfunc.predict(images.astype(np.float32))
    # the float gray-RGB network contract (B, 3, H, W) -> ab still works on the wrapped model
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    ab = pyfunc.unwrap_python_model().predict(None, x)
    with torch.inference_mode():
        expected_ab = model(torch.from_numpy(x)).numpy()
    assert ab.dtype == np.float32 and ab.shape == (2, 2, 64, 64)
    np.testing.assert_allclose(ab, expected_ab, atol=1e-5)


def test_dataset_inputs_and_val_metrics_linked_to_the_model(mlflow_server, tmp_path):
    """Lineage MLflow shows: the shards as run inputs (training and eval contexts, digest from the manifest sha256),
    and `val/*` logged by a later evaluation at the trained step and linked to the run's LoggedModel."""
    import torch

    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    mlflow_server.start()
    torch.manual_seed(0)
    small = {"nf": 64, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "dec_layers": 1, "num_queries": 8}
    checkpoint = save_checkpoint(build_model("atto", pretrained=None, **small), tmp_path / "generator")
    sha = "ab12" * 16
    tracker = MlflowTracker(mlflow_server.uri, experiment=_experiment(), log_system_metrics=False)
    tracker.log_dataset("s3://bucket/shards", sha, "training", rows=12)
    tracker.log_metrics({"train/loss": 1.0}, step=5)
    uri = tracker.log_model(checkpoint)
    tracker.finish()
    evaluation = MlflowTracker(mlflow_server.uri, run_id=tracker.run_id, log_system_metrics=False)  # as evaluate
    evaluation.log_dataset("s3://bucket/shards", sha, "eval")
    evaluation.log_metrics({"val/psnr": 21.5, "other": 2.0}, step=0)
    evaluation.finish()

    client = _client(mlflow_server.uri)
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, i.dataset.digest, i.dataset.source_type, tag.value) for i in inputs for tag in i.tags}
    assert seen == {("shards", sha[:36], "s3", "training"), ("shards (eval)", sha[:36], "s3", "eval")}
    assert all(json.loads(i.dataset.profile)["manifest_sha256"] == sha for i in inputs)
    assert json.loads(inputs[0].dataset.source) == {"uri": "s3://bucket/shards"}
    (point,) = client.get_metric_history(tracker.run_id, "val/psnr")
    assert point.step == 5 and point.value == 21.5  # the trained step, not the evaluation's 0
    assert [m.step for m in client.get_metric_history(tracker.run_id, "other")] == [0]
    model = client.get_logged_model(uri.removeprefix("models:/"))
    assert ("val/psnr", 21.5, 5) in {(m.key, m.value, m.step) for m in model.metrics or []}  # also train/* at step 5
    assert "other" not in {m.key for m in model.metrics or []}


def _l_channel(images: np.ndarray) -> np.ndarray:
    import torch

    from ddcolor.color import rgb_to_lab

    rgb = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return rgb_to_lab(rgb)[:, 0].numpy()


# virtualenv: MLflow builds a fresh environment from the logged requirements.txt (pyenv for the Python version, pip
# for the pinned packages, ddcolor from the model's code/): ~10 min on the loaded 2-core build machine the first time
# (a few GB of torch/CUDA wheels from the local wheel store), reused while the requirements are unchanged. Opt-in.
VIRTUALENV_SERVE = pytest.param(
    "virtualenv",
    marks=pytest.mark.skipif(
        os.environ.get("DDCOLOR_TEST_SERVE_VIRTUALENV") != "1",
        reason="set DDCOLOR_TEST_SERVE_VIRTUALENV=1 (builds a serving environment: ~10 min the first time)",
    ),
)


@pytest.mark.slow
@pytest.mark.parametrize("env_manager", ["local", VIRTUALENV_SERVE])
def test_logged_model_serves_colorized_images(mlflow_server, tmp_path, env_manager):
    """`mlflow models serve -m models:/m-...` answers /invocations with a colorized uint8 image; with the virtualenv
    env manager the environment holds only what the model logged (its requirements, ddcolor from code_paths)."""
    import signal
    import urllib.error
    import urllib.request

    import torch

    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    mlflow_server.start()
    torch.manual_seed(0)
    small = {"nf": 64, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "dec_layers": 1, "num_queries": 8}
    model = build_model("atto", pretrained=None, **small).eval()
    checkpoint = save_checkpoint(model, tmp_path / "generator")
    tracker = MlflowTracker(mlflow_server.uri, experiment=_experiment(), log_system_metrics=False)
    uri = tracker.log_model(checkpoint)
    tracker.finish()
    assert uri is not None

    port = free_port()
    bin_dir = os.path.dirname(sys.executable)  # mlflow runs `uvicorn` from PATH
    pyenv = os.path.expanduser("~/.pyenv/bin")  # the virtualenv manager installs the logged Python with pyenv
    path = os.pathsep.join([bin_dir, pyenv, os.environ["PATH"]])
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", env_manager]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_file = tmp_path / "serve.log"
    with open(log_file, "wb") as out:
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + (90 if env_manager == "local" else 1800)
        while True:
            assert server.poll() is None, log_file.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert time.monotonic() < deadline, "model server did not answer /ping:\n" + log_file.read_text()[-3000:]
            time.sleep(0.3)
        image = np.random.default_rng(1).integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
        body = json.dumps({"inputs": image.tolist(), "params": {"input_size": 64}}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
    colored = np.asarray(answer["predictions"])
    assert colored.shape == (1, 40, 56, 3)
    assert colored.min() >= 0 and colored.max() <= 255
    colored = colored.astype(np.uint8)
    assert np.abs(_l_channel(colored) - _l_channel(image)).max() <= 1.5  # the input's lightness kept (8-bit)
    assert not np.array_equal(colored, image)


def test_embedded_sqlite_default(tmp_path, monkeypatch):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # MLflow caches stores and database engines by URI string for the life of the process, so a relative
    # sqlite:///mlflow.db opened earlier by another test in another working directory would be reused here (see the
    # README's known gaps)
    _tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    monkeypatch.setattr(SqlAlchemyStore, "_engine_map", {})
    with MlflowTracker(experiment="local", run_name="embedded", log_system_metrics=False) as tracker:
        assert tracker.tracking_uri == "sqlite:///mlflow.db"
        tracker.log_metrics({"loss": 0.5}, step=3)
        tracker.log_image(np.zeros((8, 8, 3), np.uint8), key="val", step=3)
    with pytest.raises(RuntimeError), MlflowTracker(experiment="local", log_system_metrics=False) as failed:
        raise RuntimeError("training crashed")

    assert (tmp_path / "mlflow.db").is_file()
    client = _client("sqlite:///mlflow.db")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(3, 0.5)]
    assert client.list_artifacts(tracker.run_id, "images")
    assert client.get_run(failed.run_id).info.status == "FAILED"


@pytest.mark.parametrize("before", [None, "sqlite:////tmp/ddcolor-elsewhere.db"])
def test_temporary_tracking_uri_leaves_the_environment_as_it_was(monkeypatch, tmp_path, before):
    # MLflow's own helper unsets MLFLOW_TRACKING_URI on exit; a flow run that trains then evaluates in one process
    # would then look for the training run in ./mlflow.db
    import os

    from ddcolor.tracking.client import use_tracking_uri

    if before is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", before)
    with use_tracking_uri(f"sqlite:///{tmp_path}/inside.db"):
        pass
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


def test_attached_tracker_logs_into_the_existing_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None)
    first = start_tracker(cfg, tracking_uri=uri, run_name="train", log_system_metrics=False)
    first.log_metrics({"loss": 1.0}, step=1)
    first.finish("FINISHED")
    attached = start_tracker(cfg, tracking_uri=uri, run_id=first.run_id, tags={"stage": "eval"})
    attached.log_metrics({"val/psnr": 21.5}, step=1)
    attached.finish("FINISHED")
    run = mlflow.MlflowClient(uri).get_run(first.run_id)
    assert attached.run_id == first.run_id
    assert run.data.metrics == {"loss": 1.0, "val/psnr": 21.5}
    assert run.data.tags["stage"] == "eval" and run.info.status == "FINISHED"
    with pytest.raises(TrackingError, match="cannot open MLflow run no-such-run"):
        start_tracker(cfg, tracking_uri=uri, run_id="no-such-run")


def test_experiment_kind_tag_is_set_but_never_clobbered(tmp_path):
    import mlflow

    from ddcolor.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    untagged = client.create_experiment("made-elsewhere")
    client.create_experiment("user-tagged", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "made-elsewhere", "user-tagged"):
        MlflowTracker(uri, experiment=name, log_system_metrics=False).finish()
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG) for name in ("new", "user-tagged")}
    assert kinds == {"new": EXPERIMENT_KIND, "user-tagged": "genai_development"}
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_runs_are_named_after_what_they_are(tmp_path):
    import hashlib

    import mlflow

    data = tmp_path / "shards"
    data.mkdir()
    (data / "manifest.json").write_text('{"format": "ddcolor-lab-shards", "counts": {"rows": 3}}\n')
    sha8 = hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()[:8]
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(None, ["model.preset=atto", "data.size=128", "train.max_steps=7", f"data.shards_uri={data}"])
    client = mlflow.MlflowClient(uri)

    def name_of(**kwargs) -> str:
        tracker = start_tracker(cfg, tracking_uri=uri, log_system_metrics=False, **kwargs)
        tracker.finish()
        return client.get_run(tracker.run_id).info.run_name

    assert name_of() == f"atto-128px-7steps-{sha8}"
    assert name_of(dataset_uri=str(tmp_path / "missing")) == "atto-128px-7steps"  # no manifest: no hash
    assert name_of(tags={"prefect.flow_run_name": "vivid-okapi"}) == "vivid-okapi"
    assert name_of(run_name="nightly", tags={"prefect.flow_run_name": "vivid-okapi"}) == "nightly"
