"""Shared test fixtures: a restartable S3 server (moto, as a real subprocess) and a corpus of good and bad images.

S3::

    def test_something(s3_env):                 # env points boto3 at a fresh, empty moto; returns a bucket name
        uri = f"s3://{s3_env}/prefix"

    def test_restart(s3_server, s3_env):        # s3_server.stop() / .start(): a real process restart
        s3_server.stop(); ...; s3_server.start()  # NB: moto keeps state in memory, a restart empties it

Images::

    def test_bad_inputs(bad_image_corpus):      # ImageCorpus: .root, .good, .bad {path: reason keyword}, ...
        ...

The corpus builder is also importable (``from conftest import make_image_corpus``) for module-scoped fixtures.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddcolor.recipes import recipe_sections

# --- S3 server -------------------------------------------------------------------------------------------

S3_BUCKET = "ddcolor-test"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """A moto S3 server in its own process on a fixed 127.0.0.1 port, so it can be stopped and restarted.

    Attributes:
        port: the TCP port (the same across restarts).
        endpoint_url: ``http://127.0.0.1:<port>``.
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server process (no-op if running) and wait until it answers HTTP."""
        if self.running:
            return
        script = Path(sys.executable).with_name("moto_server")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            if self.log_path:
                log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self._proc.returncode} (port {self.port} taken?)")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {timeout} s")

    def stop(self) -> None:
        """Stop the server process (no-op if stopped); its state (buckets, objects) is lost."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reset(self) -> None:
        """Drop all state (``POST /moto-api/reset``)."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is up
        except OSError:
            return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide moto S3 server subprocess: ``.endpoint_url``, ``.stop()``, ``.start()``, ``.reset()``."""
    server = S3Server(log_path=tmp_path_factory.mktemp("moto") / "moto_server.log")
    server.start()
    yield server
    server.stop()


def make_bucket(endpoint_url: str, bucket: str = S3_BUCKET) -> None:
    """Create ``bucket`` on the server (with the test credentials)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, tmp_path: Path) -> str:
    """Point boto3 (via the environment) at a freshly reset moto server with one empty bucket; return its name.

    Sets AWS_ENDPOINT_URL, fake credentials, AWS_DEFAULT_REGION=us-east-1 and the two checksum variables; removes
    AWS_PROFILE and points the AWS config files at nothing, so no real credentials can be used.
    """
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if not s3_server.running:  # a previous test stopped it and failed before restarting
        s3_server.start()
    s3_server.reset()
    make_bucket(s3_server.endpoint_url, S3_BUCKET)
    return S3_BUCKET


# --- images ----------------------------------------------------------------------------------------------


@dataclass
class ImageCorpus:
    """Files written by `make_image_corpus`.

    Attributes:
        root: the folder (all files are directly in it, plus ``sub/`` for one good image).
        good: files every reader must accept (RGB photos, random colors, gray photo, CMYK JPEG, 16-bit gray PNG,
            palette PNG, RGBA PNG, EXIF-rotated JPEG), all at least `min_side` px on each side.
        bad: file -> keyword expected (case-insensitive) in the rejection reason.
        max_pixels: the decompression-bomb limit the ``bomb.png`` file exceeds (good files are below it).
        min_side: the ``tiny.png`` file is smaller than this on both sides (16x16).
        gray: the grayscale photo (low colorfulness); colorful: files with high colorfulness.
        rotated: the EXIF-rotated JPEG (stored 96 wide x 64 high, orientation 6: upright it is 64 wide x 96 high).
    """

    root: Path
    good: list[Path] = field(default_factory=list)
    bad: dict[Path, str] = field(default_factory=dict)
    max_pixels: int = 128 * 128
    min_side: int = 32
    gray: Path | None = None
    colorful: list[Path] = field(default_factory=list)
    rotated: Path | None = None

    @property
    def all(self) -> list[Path]:
        return sorted([*self.good, *self.bad])


def _sample(name: str, width: int, height: int) -> Image.Image:
    """A scikit-image sample photo resized small (falls back to a smooth color gradient if unavailable)."""
    try:
        import skimage.data

        arr = getattr(skimage.data, name)()
        im = Image.fromarray(arr)
    except Exception:  # pragma: no cover - skimage data missing
        yy, xx = np.mgrid[0:height, 0:width]
        arr = np.stack([xx * 255 // width, yy * 255 // height, 128 + 0 * xx], axis=-1).astype(np.uint8)
        im = Image.fromarray(arr)
    return im.resize((width, height), Image.Resampling.BILINEAR)


def random_color_image(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    """A colorful image of random 8x8-px color blocks (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]
    return Image.fromarray(np.ascontiguousarray(arr))


def _save(im: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **options)
    return path


def _encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def make_random_images(root: Path, n: int, start_seed: int = 1000, prefix: str = "rand") -> list[Path]:
    """Write ``n`` distinct colorful PNGs (`random_color_image`) into ``root``; return their paths."""
    return [_save(random_color_image(start_seed + i), root / f"{prefix}_{start_seed + i:05d}.png") for i in range(n)]


def make_image_corpus(root: Path, n_random: int = 3) -> ImageCorpus:
    """Write every kind of good and bad input image into ``root`` (small files; about 25 ms)."""
    root.mkdir(parents=True, exist_ok=True)
    corpus = ImageCorpus(root=root)
    good = corpus.good

    # good: photos and random colors
    good.append(_save(_sample("astronaut", 80, 80), root / "astronaut.jpg", quality=90))
    good.append(_save(_sample("coffee", 96, 64), root / "coffee.png"))
    good.append(_save(_sample("chelsea", 90, 60), root / "sub" / "chelsea.webp", quality=90))
    corpus.colorful = [good[0], *make_random_images(root, n_random)]
    good.extend(corpus.colorful[1:])
    corpus.gray = _save(_sample("camera", 64, 64), root / "camera_gray.png")
    good.append(corpus.gray)
    # good: unusual but valid modes
    color = random_color_image(7, 64, 48)
    good.append(_save(color.convert("CMYK"), root / "cmyk.jpg", quality=90))
    gray16 = Image.fromarray((np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16))
    good.append(_save(gray16, root / "gray16.png"))
    good.append(_save(random_color_image(8, 64, 48).convert("P", palette=Image.Palette.ADAPTIVE), root / "pal.png"))
    rgba = random_color_image(9, 64, 48).convert("RGBA")
    rgba.putalpha(200)
    good.append(_save(rgba, root / "rgba.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    corpus.rotated = _save(random_color_image(10, 96, 64), root / "rotated.jpg", quality=90, exif=exif.tobytes())
    good.append(corpus.rotated)

    # bad
    bad = corpus.bad
    (root / "empty.jpg").write_bytes(b"")
    bad[root / "empty.jpg"] = "empty"
    jpeg = _encoded(random_color_image(11, 64, 64), "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad[root / "truncated.jpg"] = "truncated"
    png = _encoded(random_color_image(12, 64, 64), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    bad[root / "truncated.png"] = "truncated"
    (root / "notes.jpg").write_text("this is not an image\n" * 10)
    bad[root / "notes.jpg"] = "not an image"
    _save(random_color_image(13, 16, 16), root / "tiny.png")
    bad[root / "tiny.png"] = "too small"
    _save(Image.new("RGB", (256, 256), (200, 30, 30)), root / "bomb.png")  # 65,536 px > max_pixels 16,384
    bad[root / "bomb.png"] = "too large"
    _save(Image.fromarray(np.full((48, 48), 0.5, dtype=np.float32)), root / "float32.tif")
    bad[root / "float32.tif"] = "not supported"
    return corpus


@pytest.fixture
def bad_image_corpus(tmp_path: Path) -> ImageCorpus:
    """A folder with good images (incl. CMYK, 16-bit, palette, RGBA, EXIF-rotated) and every kind of bad input."""
    return make_image_corpus(tmp_path / "corpus")


# --- mlflow ----------------------------------------------------------------------------------------------
#
#     def test_something(mlflow_server):          # MlflowServer: .uri, .stop(), .start(), .running
#         tracker = MlflowTracker(mlflow_server.uri, experiment="test-something")
#
# One real `mlflow server` process (SQLite backend, proxied artifacts in a tmp folder) for the session; `.stop()`
# and `.start()` restart it on the same port with the same store, so runs survive a restart.


class MlflowServer:
    """An ``mlflow server`` subprocess on a fixed 127.0.0.1 port (restartable; state kept in ``root``).

    Attributes:
        root: folder with ``mlflow.db`` (backend store), ``artifacts/`` (proxied artifact store) and ``server.log``.
        port: the TCP port (the same across restarts).
        uri: ``http://127.0.0.1:<port>``, the tracking URI.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        """Start the server (no-op if running) and wait until ``GET /health`` answers 200."""
        import os

        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        script = Path(sys.executable).with_name("mlflow")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]
        # --artifacts-destination: artifacts go through the server (mlflow-artifacts:/), so a stopped server
        # also stops artifact uploads. The default --allowed-hosts already accepts 127.0.0.1 and localhost.
        args = [
            *("server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"),
            *("--artifacts-destination", str(self.root / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job workers: starts faster, fewer processes
        with open(self.root / "server.log", "ab") as log:
            # own process group: the server forks uvicorn and a job runner; stop() ends all three
            self._proc = subprocess.Popen(
                [*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._proc.returncode}; see {self.root / 'server.log'}"
                )
            if self._healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {timeout} s")

    def stop(self) -> None:
        """Stop the server and its child processes (no-op if stopped); the store on disk is kept."""
        import contextlib
        import os
        import signal

        if self._proc is None:
            return

        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # children still shutting down
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc = None
        deadline = time.monotonic() + 10
        while self._healthy() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide ``mlflow server`` subprocess: ``.uri``, ``.stop()``, ``.start()`` (same port, same store)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


# --- the tiny pipeline recipe ----------------------------------------------------------------------------------
#
#     from conftest import TINY_RECIPE, tiny_recipe, dotted
#     params = tiny_recipe(data={"shard_rows": 4})      # params.yaml sections (flow / deployment parameters)
#     cfg = load_config(None, dotted(params))           # the same as dotted overrides

#: A whole pipeline run in seconds on 2 CPU cores, shared by the pipeline, flow, DVC and deployment tests: the
#: packaged ``tiny`` recipe (ddcolor/configs/tiny.yaml: random-init atto with a small decoder, 64 px, 2 steps, metrics
#: without Inception/AlexNet), also what bench/orchestration.py runs.
TINY_RECIPE: dict[str, dict] = recipe_sections("tiny")


def tiny_recipe(**changes: dict) -> dict[str, dict]:
    """`TINY_RECIPE` with ``section={key: value}`` changes merged in (a new dict; the constant is not touched)."""
    merged = {section: dict(values) for section, values in TINY_RECIPE.items()}
    for section, values in changes.items():
        merged.setdefault(section, {}).update(values)
    return merged


def dotted(sections: dict[str, dict]) -> dict[str, object]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (overrides for `ddcolor.config.load_config`)."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


# --- headless Chromium (browser tests of the playground and of the MLflow UI) ------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # without these Chromium keeps calling Google services on the closed network
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; skips with how to enable it (fails in CI, which installs it)."""
    # .ci/run installs chromium and sets DDCOLOR_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip
    missing = pytest.fail if os.environ.get("DDCOLOR_REQUIRE_BROWSER") == "1" else pytest.skip
    if not CHROMIUM.exists():
        missing("browser tests need Debian's chromium at /usr/bin/chromium: `apt-get install chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("browser tests need Playwright's Python package: `pip install playwright` (no browser download)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


# --- Prefect ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server per test module (PREFECT_HOME in a tmp folder, no telemetry); a module may
    override it (the end-to-end deployment test starts a real `prefect server start` of its own)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mp.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
    mp.undo()
