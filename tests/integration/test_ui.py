"""The web playground (`ddcolor ui`): the JSON API, the model cache, the registry catalogue and the real page.

* API tests call `create_app` through FastAPI's TestClient with explicit random-init atto models at 64 px (no weights).
* Registry tests (slow) run against the real `mlflow_server` fixture (SQLite backend).
* Browser tests (slow) start the app with uvicorn on 127.0.0.1 and drive the page in headless Debian Chromium through
  Playwright's Python API; they skip, saying how to enable them, when /usr/bin/chromium or playwright is missing.
  With ``DDCOLOR_UI_SCREENSHOT=docs/ui.png`` the screenshot test writes the README screenshot there.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import skimage.data
from fastapi.testclient import TestClient
from PIL import Image
from skimage.color import rgb2lab

from ddcolor.colorize import Colorizer, random_init_model
from ddcolor.config import load_config
from ddcolor.ui import UiSettings, create_app
from ddcolor.ui.models import CachedModel, ModelCache, mlflow_run_link
from tests.helpers.servers import free_port

SIZE = 64  # network input size, px
SMALL = {"nf": 64, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "dec_layers": 1, "num_queries": 8}


def photo_png(width: int = 131, height: int = 97, gray: bool = True) -> bytes:
    """skimage's astronaut at an odd size (not a multiple of 32), PNG bytes; gray = its luminance only."""
    im = Image.fromarray(skimage.data.astronaut()).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    (im.convert("L") if gray else im).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def post_colorize(client, files: list[tuple[str, bytes]], model: str = "random-init:atto:0", size: int = SIZE, **kw):
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post("/api/colorize", files=parts, data={"model": model, "input_size": str(size)}, **kw)


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict[str, str]:
    """No registry store and an empty weights cache: everything must work with random-init models only."""
    root = tmp_path_factory.mktemp("ui-offline")
    return {"tracking_uri": f"sqlite:///{root / 'absent.db'}", "weights": str(root / "weights")}


@pytest.fixture
def no_weights(offline_env, monkeypatch):
    monkeypatch.setenv("DDCOLOR_WEIGHTS_DIR", offline_env["weights"])


@pytest.fixture(scope="module")
def app(offline_env):
    settings = UiSettings(max_upload_bytes=300_000, max_files=4, input_sizes=(SIZE, 128), default_input_size=SIZE)
    return create_app(load_config(None), tracking_uri=offline_env["tracking_uri"], device="cpu", settings=settings)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


# --- colorize ----------------------------------------------------------------------------------------------


def test_colorize_keeps_size_and_matches_the_cli_pipeline(client):
    gray, color = photo_png(131, 97), photo_png(70, 45, gray=False)
    res = post_colorize(client, [("astronaut.png", gray), ("color.png", color)])
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["errors"] == [] and body["input_size"] == SIZE
    assert body["model"]["random_init"] is True and "meaningless" in body["model"]["label"]
    assert [(r["name"], r["width"], r["height"]) for r in body["results"]] == [
        ("astronaut.png", 131, 97),
        ("color.png", 70, 45),
    ]
    out = decode_data_url(body["results"][0]["output"])
    assert out.size == (131, 97) and out.mode == "RGB"
    assert decode_data_url(body["results"][0]["input"]).size == (131, 97)
    assert body["results"][0]["download"].startswith("astronaut_") and body["results"][0]["download"].endswith(".png")
    # the same pixels as the CLI's Colorizer with the same random-init model: no second pipeline
    source = np.asarray(Image.open(io.BytesIO(gray)).convert("RGB"))
    expected = Colorizer(random_init_model("atto", seed=0, warn=False), input_size=SIZE, device="cpu").colorize(source)
    got = np.asarray(out)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # only chrominance changes: lightness is the input's
    assert np.abs(rgb2lab(got)[..., 0] - rgb2lab(source)[..., 0]).mean() < 1.0


def test_non_image_is_named_with_its_reason(client):
    res = post_colorize(client, [("notes.txt", b"this is not an image\n" * 10)])
    assert res.status_code == 422
    body = res.json()
    assert "notes.txt" in body["error"] and "not an image" in body["error"]
    assert body["errors"] == [
        {"index": 0, "file": "notes.txt", "reason": "not an image, or an unsupported format (PIL cannot identify it)"}
    ]
    # with a good file next to it, the good one is colorized and the bad one reported
    res = post_colorize(client, [("empty.jpg", b""), ("astronaut.png", photo_png())])
    assert res.status_code == 200
    assert [r["name"] for r in res.json()["results"]] == ["astronaut.png"]
    assert res.json()["results"][0]["index"] == 1
    assert res.json()["errors"] == [{"index": 0, "file": "empty.jpg", "reason": "empty file (0 bytes)"}]
    truncated = photo_png()[:300]
    res = post_colorize(client, [("cut.png", truncated)])
    assert res.status_code == 422 and "cut.png" in res.json()["error"] and "truncated" in res.json()["error"]


def test_too_large_upload_is_refused_with_the_limit(client):
    big = b"\x89PNG" + bytes(400_000)  # over the 0.3 MB per-file limit of the module's app
    res = post_colorize(client, [("huge.png", big)])
    assert res.status_code == 413
    assert "huge.png" in res.json()["error"] and "0.4 MB exceeds the 0.3 MB limit per file" in res.json()["error"]
    res = post_colorize(client, [("huge.png", big), ("ok.png", photo_png())])
    assert res.status_code == 200 and res.json()["errors"][0]["reason"].startswith("too large")
    # a body over max_files x limit + 1 MiB is refused from its Content-Length, before it is read
    res = post_colorize(client, [(f"{i}.png", bytes(900_000)) for i in range(3)])  # 2.7 MB > 4 x 0.3 MB + 1 MiB
    assert res.status_code == 413 and "request too large" in res.json()["error"]
    res = post_colorize(client, [(f"{i}.png", photo_png()) for i in range(5)])  # max_files = 4
    assert res.status_code == 400 and "at most 4 files" in res.json()["error"]


def test_bad_choices_get_clear_messages(client):
    res = post_colorize(client, [("a.png", photo_png())], model="no-such-model")
    assert res.status_code == 404
    assert "unknown model 'no-such-model'" in res.json()["error"] and "random-init:atto:SEED" in res.json()["error"]
    res = post_colorize(client, [("a.png", photo_png())], model="random-init:resnet:x")
    assert res.status_code == 404 and "random-init:PRESET:SEED" in res.json()["error"]
    res = post_colorize(client, [("a.png", photo_png())], model="")
    assert res.status_code == 400 and "no model chosen" in res.json()["error"]
    res = post_colorize(client, [("a.png", photo_png())], model="champion")
    assert res.status_code == 502 and "no MLflow store" in res.json()["error"]
    res = post_colorize(client, [("a.png", photo_png())], size=100)
    assert res.status_code == 400 and "multiple of 32" in res.json()["error"]
    res = client.post("/api/colorize", data={"model": "random-init:atto:0"})
    assert res.status_code == 400 and "no image uploaded" in res.json()["error"]


def test_release_not_in_cache_says_how_to_fetch(no_weights, client):
    res = post_colorize(client, [("a.png", photo_png())], model="ddcolor_paper_tiny")
    assert res.status_code == 404 and "ddcolor weights fetch ddcolor_paper_tiny" in res.json()["error"]


def test_checkpoint_paths(tmp_path, offline_env):
    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    path = save_checkpoint(build_model("atto", pretrained=None, **SMALL).eval(), tmp_path / "offered" / "gen")
    stray = save_checkpoint(build_model("atto", pretrained=None, **SMALL).eval(), tmp_path / "stray")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    exposed = create_app(
        tracking_uri=offline_env["tracking_uri"], checkpoints=[tmp_path / "offered"], allow_any_path=False, device="cpu"
    )
    client = TestClient(exposed)
    listed = [m for m in client.get("/api/models").json()["models"] if m["kind"] == "checkpoint"]
    assert [m["id"] for m in listed] == [str(path.resolve())]
    res = post_colorize(client, [("a.png", photo_png())], model=str(path))
    assert res.status_code == 200 and res.json()["results"][0]["width"] == 131
    res = post_colorize(client, [("a.png", photo_png())], model=str(stray))
    assert res.status_code == 403 and "--checkpoint PATH" in res.json()["error"]
    loopback = TestClient(create_app(tracking_uri=offline_env["tracking_uri"], allow_any_path=True, device="cpu"))
    assert post_colorize(loopback, [("a.png", photo_png())], model=str(stray)).status_code == 200
    res = post_colorize(loopback, [("a.png", photo_png())], model=str(tmp_path / "junk.safetensors"))
    assert res.status_code == 422 and "cannot load the model" in res.json()["error"]
    res = post_colorize(loopback, [("a.png", photo_png())], model=str(tmp_path / "gone.safetensors"))
    assert res.status_code == 404 and "no such file" in res.json()["error"]


def test_unexpected_errors_are_json_not_stack_traces(offline_env):
    def broken(resolved):
        raise KeyError("boom")

    app = create_app(tracking_uri=offline_env["tracking_uri"], device="cpu", loader=broken)
    res = post_colorize(TestClient(app, raise_server_exceptions=False), [("a.png", photo_png())])
    assert res.status_code == 500
    assert res.json() == {"error": "internal error (KeyError: 'boom'); the server log has the details"}


# --- catalogue, samples, page ---------------------------------------------------------------------------------


def test_catalogue_without_registry_or_weights(no_weights, client):
    body = client.get("/api/models").json()
    assert body["registry"]["error"].startswith("no MLflow store at")
    assert body["input_sizes"] == [SIZE, 128] and body["default_input_size"] == SIZE
    assert body["max_upload_bytes"] == 300_000 and body["max_files"] == 4
    kinds = {m["id"]: m for m in body["models"]}
    assert kinds["random-init:atto:0"]["random_init"] and "meaningless" in kinds["random-init:atto:0"]["label"]
    assert kinds["ddcolor_paper_tiny"]["available"] is False
    assert "ddcolor weights fetch ddcolor_paper_tiny" in kinds["ddcolor_paper_tiny"]["note"]
    assert "astronaut" in body["samples"]
    sample = client.get("/api/samples/astronaut")
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    arr = np.asarray(Image.open(io.BytesIO(sample.content)))
    assert arr.shape == (512, 512)  # grayscale: the network sees only L
    assert client.get("/api/samples/nope").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="run"' in page.text and "http" not in page.text.replace("http-equiv", "")
    for name in ("app.js", "app.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and "https://" not in asset.text  # fully offline: no CDN, no fonts


def test_mlflow_run_link():
    assert mlflow_run_link("http://mlflow:5000/", "3", "abc") == (
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning",
        "MLflow run abc",
    )
    url, hint = mlflow_run_link("sqlite:///mlflow.db", "3", "abc")
    assert url is None and hint.startswith("run `mlflow ui --backend-store-uri sqlite:///mlflow.db`")
    assert hint.endswith("/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert (
        mlflow_run_link("https://u:secret@host/", "1", "r")[0]
        == "https://u:***@host/#/experiments/1/runs/r?workflowType=machine_learning"
    )


# --- auth -------------------------------------------------------------------------------------------------


def test_token_is_enforced(offline_env):
    settings = UiSettings(auth_token="s3cret", input_sizes=(SIZE,), default_input_size=SIZE)
    client = TestClient(create_app(tracking_uri=offline_env["tracking_uri"], device="cpu", settings=settings))
    for path in ("/", "/api/models", "/static/app.js"):
        res = client.get(path)
        assert res.status_code == 401 and res.headers["www-authenticate"].startswith("Basic")
        assert "authentication required" in res.json()["error"]
    assert post_colorize(client, [("a.png", photo_png())]).status_code == 401
    assert client.get("/api/health").status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/", auth=("anyone", "s3cret")).status_code == 200
    assert client.get("/", auth=("anyone", "wrong")).status_code == 401
    assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
    res = post_colorize(client, [("a.png", photo_png())], headers={"Authorization": "Bearer s3cret"})
    assert res.status_code == 200


def test_cli_ui_binds_loopback_and_warns_when_exposed(monkeypatch, offline_env):
    import uvicorn
    from typer.testing import CliRunner

    from ddcolor.cli import app as cli

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: started.append((app, host, port)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", offline_env["tracking_uri"])
    monkeypatch.delenv("DDCOLOR_UI_TOKEN", raising=False)
    runner = CliRunner()
    res = runner.invoke(cli, ["ui", "--port", "7999"])
    assert res.exit_code == 0, res.output
    assert started[-1][1:] == ("127.0.0.1", 7999) and "WARNING" not in res.output
    assert "http://127.0.0.1:7999/" in res.output
    res = runner.invoke(cli, ["ui", "--host", "0.0.0.0"])
    assert res.exit_code == 0 and "WITHOUT a token" in res.output and "--auth-token" in res.output
    exposed = TestClient(started[-1][0])
    assert exposed.get("/api/models").status_code == 200
    res = post_colorize(exposed, [("a.png", photo_png())], model="/etc/passwd.safetensors")
    assert res.status_code == 403  # typed paths are off beyond loopback
    res = runner.invoke(cli, ["ui", "--host", "0.0.0.0"], env={"DDCOLOR_UI_TOKEN": "tok"})
    assert res.exit_code == 0 and "WITHOUT a token" not in res.output
    assert TestClient(started[-1][0]).get("/api/models").status_code == 401
    res = runner.invoke(cli, ["ui", "--checkpoint", "/no/such/dir"])
    assert res.exit_code == 2 and "no such file or folder" in res.output
    res = runner.invoke(cli, ["ui", "--registered-model", "ddcolor-demo"])  # what `ddcolor demo` registers
    assert res.exit_code == 0, res.output
    assert TestClient(started[-1][0]).get("/api/models").json()["registry"]["model_name"] == "ddcolor-demo"


# --- cache and locking -----------------------------------------------------------------------------------


class _FakeColorizer:
    """Stands in for `Colorizer`: records how many calls overlap."""

    def __init__(self, *args, **kwargs) -> None:
        self.active = 0
        self.max_active = 0
        self.guard = threading.Lock()

    def colorize_float(self, rgbs):
        with self.guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(0.05)
        with self.guard:
            self.active -= 1
        return rgbs


def test_cache_loads_once_keeps_lru_and_serialises_per_model(monkeypatch):
    import ddcolor.colorize

    monkeypatch.setattr(ddcolor.colorize, "Colorizer", _FakeColorizer)
    loads = []

    def loader(resolved):
        loads.append(resolved.key)
        time.sleep(0.1)  # a slow load: concurrent requests must wait for it, not load again
        return object()

    cache = ModelCache(load_config(None), "sqlite:///absent.db", max_entries=2, loader=loader)
    threads = [threading.Thread(target=cache.get, args=("random-init:atto:0", SIZE)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["random-init:atto:0"]
    assert cache.get("random-init:atto", SIZE) is cache.get("random-init:atto:0", SIZE)  # seed 0 by default
    cache.get("random-init:atto:0", 128)
    cache.get("random-init:atto:1", SIZE)  # third entry: the least recently used goes
    assert cache.loaded() == [("random-init:atto:0", 128), ("random-init:atto:1", SIZE)]
    cache.get("random-init:atto:0", SIZE)
    assert loads == ["random-init:atto:0", "random-init:atto:0", "random-init:atto:1", "random-init:atto:0"]

    entry = cache.get("random-init:atto:0", SIZE)
    assert isinstance(entry, CachedModel)
    calls = [threading.Thread(target=entry.colorize, args=([np.zeros((2, 2, 3))],)) for _ in range(4)]
    for t in calls:
        t.start()
    for t in calls:
        t.join()
    assert entry.colorizer.max_active == 1  # one request at a time per model


class LiveServer:
    """The app served by uvicorn in a background thread on a free 127.0.0.1 port."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_page_stays_responsive_while_a_model_works(offline_env):
    """A slow model load runs in a worker thread: the event loop keeps answering other requests."""
    import torch

    from ddcolor.model import build_model

    def slow_loader(resolved):
        time.sleep(2.0)
        torch.manual_seed(0)
        return build_model("atto", pretrained=None, **SMALL).eval()

    app = create_app(tracking_uri=offline_env["tracking_uri"], device="cpu", loader=slow_loader)
    with LiveServer(app) as live:
        result = {}

        def slow_request() -> None:
            with httpx.Client(base_url=live.url, timeout=60) as http:
                result["res"] = post_colorize(http, [("a.png", photo_png())])

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.3)
        with httpx.Client(base_url=live.url, timeout=5) as http:
            start = time.perf_counter()
            assert http.get("/api/health").status_code == 200
            assert http.get("/").status_code == 200
            answered_s = time.perf_counter() - start
        still_working = worker.is_alive()
        worker.join(30)
    assert still_working and answered_s < 1.0
    assert result["res"].status_code == 200 and result["res"].json()["results"][0]["width"] == 131


# --- the registry (real MLflow server) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(mlflow_server, tmp_path_factory):
    """A registered model with two versions: v1 champion (gate passed), v2 challenger (gate failed vs champion).

    Returns ``(config, {version: run_id}, experiment_id)``.
    """
    import mlflow
    import torch

    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint
    from ddcolor.model_card import attach_model_card
    from ddcolor.registry import gate_run, promote, register
    from ddcolor.tracking import MlflowTracker

    mlflow_server.start()
    name = f"ddcolor-ui-{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, overrides={"registry.model_name": name, "gates.max_fid": 30.0})
    client = mlflow.MlflowClient(mlflow_server.uri)
    runs = {}
    for seed, fid in ((0, 15.0), (1, 25.0)):
        torch.manual_seed(seed)
        model = build_model("atto", pretrained=None, **SMALL).eval()
        checkpoint = save_checkpoint(model, tmp_path_factory.mktemp("ui-reg") / "generator")
        tracker = MlflowTracker(mlflow_server.uri, experiment="test-ui", log_system_metrics=False)
        model_uri = tracker.log_model(checkpoint)
        tracker.finish()
        run_id = tracker.run_id
        metrics = {"fid": fid, "colorfulness": 30.0, "delta_colorfulness": 2.0, "psnr": 22.0, "n_images": 5000.0}
        for key, value in metrics.items():
            client.log_metric(run_id, f"val/{key}", value, step=1)
        client.set_tag(run_id, "ddcolor.model_uri", model_uri)
        client.set_tag(run_id, "eval.dataset_sha256", "ab" * 32)  # both measured on the same val split
        client.set_tag(run_id, "eval.config_sha256", "cd" * 32)
        version = register(run_id, None, cfg, tracking_uri=mlflow_server.uri, attach_onnx=False)
        decision = gate_run(run_id, cfg, tracking_uri=mlflow_server.uri)
        promote(version, decision, cfg, tracking_uri=mlflow_server.uri)
        attach_model_card(cfg, version, tracking_uri=mlflow_server.uri, decision=decision)
        runs[version] = run_id
    experiment = client.get_experiment_by_name("test-ui").experiment_id
    return cfg, runs, experiment


@pytest.mark.slow
def test_catalogue_shows_versions_metrics_gates_and_runs(registry, mlflow_server, tmp_path, monkeypatch):
    cfg, runs, experiment = registry
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the app's own URI must be used everywhere
    monkeypatch.chdir(tmp_path)
    name = cfg.registry.model_name
    app = create_app(cfg, tracking_uri=mlflow_server.uri, device="cpu")
    client = TestClient(app)
    body = client.get("/api/models").json()
    reg = body["registry"]
    assert reg["error"] is None and reg["aliases"] == {"champion": "1", "challenger": "2"}
    ids = [m["id"] for m in body["models"]]
    assert ids[:4] == ["champion", "challenger", f"models:/{name}/2", f"models:/{name}/1"]
    versions = {v["version"]: v for v in reg["versions"]}
    assert versions["1"]["metrics"] == {
        "fid": 15.0, "colorfulness": 30.0, "delta_colorfulness": 2.0, "psnr": 22.0, "n_images": 5000.0
    }  # fmt: skip
    assert versions["1"]["model_card"].startswith(f"# Model card: {name} v1")  # shown beside the version
    assert "## Gate decision" in versions["2"]["model_card"] and "fid_vs_champion" in versions["2"]["model_card"]
    assert versions["1"]["gate"]["passed"] is True and versions["1"]["aliases"] == ["champion"]
    assert versions["2"]["gate"]["passed"] is False and versions["2"]["metrics"]["fid"] == 25.0
    failed = [c["name"] for c in versions["2"]["gate"]["checks"] if not c["passed"]]
    assert failed == ["fid_vs_champion"]
    for version, run_id in runs.items():
        assert versions[version]["run_id"] == run_id
        assert (
            versions[version]["run_url"]
            == f"{mlflow_server.uri}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
        )

    # champion is resolved to its version: one cache entry for "champion" and "models:/NAME/1"
    res = post_colorize(client, [("a.png", photo_png())], model="champion")
    assert res.status_code == 200, res.text
    assert res.json()["model"]["version"] == "1" and res.json()["model"]["label"] == f"{name} v1 (champion)"
    assert res.json()["results"][0]["width"] == 131
    res = post_colorize(client, [("a.png", photo_png())], model=f"models:/{name}/1")
    assert res.status_code == 200
    assert app.state.cache.loaded() == [(f"models:/{name}/1", SIZE)]
    res = post_colorize(client, [("a.png", photo_png())], model=f"models:/{name}/9")
    assert res.status_code == 404 and f"models:/{name}/9" in res.json()["error"]
    assert not list(tmp_path.iterdir())  # no default store (mlflow.db, mlruns/) was created on the side


@pytest.mark.slow
def test_unreachable_registry_is_reported_not_hung(offline_env):
    client = TestClient(create_app(tracking_uri=f"http://127.0.0.1:{free_port()}", device="cpu"))
    start = time.perf_counter()
    body = client.get("/api/models").json()
    assert "is not reachable" in body["registry"]["error"] and time.perf_counter() - start < 15
    assert any(m["id"] == "random-init:atto:0" for m in body["models"])  # the rest still works
    res = post_colorize(client, [("a.png", photo_png())], model="champion")
    assert res.status_code == 502 and "is not reachable" in res.json()["error"]


# --- the page in headless Chromium --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> list[Path]:
    """Two small atto generators with different random weights (stand-ins for two trained versions)."""
    import torch

    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ui-ckpt")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(save_checkpoint(build_model("atto", pretrained=None, **SMALL).eval(), root / f"gen_seed{seed}"))
    return paths


@pytest.fixture(scope="module")
def live(two_checkpoints, offline_env):
    settings = UiSettings(input_sizes=(SIZE, 128), default_input_size=SIZE, max_upload_bytes=2_000_000)
    app = create_app(
        tracking_uri=offline_env["tracking_uri"], checkpoints=two_checkpoints, device="cpu", settings=settings
    )
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def page(browser, live):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(live.url + "/")
    page.wait_for_selector("#models input[type=checkbox]")
    yield page
    context.close()


def _natural_size(page, selector: str) -> tuple[int, int]:
    page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.naturalWidth > 0 }", arg=selector
    )
    return tuple(page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]"))


def _upload(page, name: str, data: bytes, mime: str = "image/png") -> None:
    page.set_input_files("#files", files=[{"name": name, "mimeType": mime, "buffer": data}])


@pytest.mark.slow
def test_browser_upload_photo_gets_colorized_image_of_its_size(page, two_checkpoints):
    _upload(page, "astronaut.png", photo_png(173, 131))
    page.check(f"#models input[value='{two_checkpoints[0]}']")
    page.select_option("#size", str(SIZE))
    page.click("#run")
    assert _natural_size(page, "#result-0-0") == (173, 131)
    assert _natural_size(page, "#slider-after") == (173, 131)
    assert _natural_size(page, "#slider-before") == (173, 131)
    assert page.get_attribute("#grid a.download", "download").startswith("astronaut_checkpoint_gen_seed0")
    assert page.inner_text("#errors") == ""


@pytest.mark.slow
def test_browser_compares_two_versions_side_by_side(page, two_checkpoints):
    _upload(page, "astronaut.png", photo_png(150, 100, gray=False))
    for path in two_checkpoints:
        page.check(f"#models input[value='{path}']")
    page.click("#run")
    sizes = [_natural_size(page, f"#result-0-{j}") for j in range(2)]
    assert sizes == [(150, 100), (150, 100)]
    headers = page.locator("#grid thead th").all_inner_texts()
    assert headers[0] == "input" and "gen_seed0" in headers[1] and "gen_seed1" in headers[2]
    first, second = (page.get_attribute(f"#result-0-{j}", "src") for j in range(2))
    assert first != second  # different weights, different colors
    assert page.locator("#model-info .card").count() == 2
    page.click("#result-0-1")  # a grid image goes into the before/after slider
    assert page.get_attribute("#slider-after", "src") == second


@pytest.mark.slow
def test_browser_non_image_shows_the_error(page):
    _upload(page, "notes.txt", b"this is not an image\n" * 10, mime="text/plain")
    page.check("#models input[value='random-init:atto:0']")
    assert page.is_visible("#random-warning")  # random-init is labelled loudly
    page.click("#run")
    page.wait_for_selector("#errors p")
    text = page.inner_text("#errors")
    assert "notes.txt" in text and "not an image" in text
    assert page.locator("#grid img.result").count() == 0


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DDCOLOR_UI_SCREENSHOT"), reason="set DDCOLOR_UI_SCREENSHOT=docs/ui.png")
def test_browser_screenshot_for_the_readme(browser, registry, mlflow_server):
    """Champion vs challenger of a real (test) registry on two bundled samples: the README screenshot.

    The registered generators have random weights (no trained model exists offline), so their colors are faint.
    """
    cfg, _, _ = registry
    settings = UiSettings(input_sizes=(256, 512), default_input_size=256)
    app = create_app(cfg, tracking_uri=mlflow_server.uri, device="cpu", settings=settings)
    with LiveServer(app) as server:
        context = browser.new_context(viewport={"width": 1440, "height": 1100})
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(server.url + "/")
        page.wait_for_selector("#models input[value='champion']")
        for sample in ("astronaut", "chelsea"):
            page.click(f"#samples button[data-sample='{sample}']")
        page.wait_for_function("document.querySelectorAll('#image-list li').length === 2")
        page.check("#models input[value='champion']")
        page.check("#models input[value='challenger']")
        page.click("#run")
        for i in range(2):
            for j in range(2):
                _natural_size(page, f"#result-{i}-{j}")
        page.fill("#slider-range", "45")
        page.dispatch_event("#slider-range", "input")
        target = Path(os.environ["DDCOLOR_UI_SCREENSHOT"])
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
        context.close()
    assert Image.open(target).size[0] == 1440
