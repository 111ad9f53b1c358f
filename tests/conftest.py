"""Shared fixtures (thin wrappers around ``tests/helpers/``) and pytest hooks; nothing here is imported by tests.

S3::

    def test_something(s3_env):                 # env points boto3 at a fresh, empty moto; returns a bucket name
        uri = f"s3://{s3_env}/prefix"

    def test_restart(s3_server, s3_env):        # s3_server.stop() / .start(): a real process restart
        s3_server.stop(); ...; s3_server.start()  # NB: moto keeps state in memory, a restart empties it

Images::

    def test_bad_inputs(bad_image_corpus):      # ImageCorpus: .root, .good, .bad {path: reason keyword}, ...
        ...

MLflow::

    def test_something(mlflow_server):          # MlflowServer: .uri, .stop(), .start(), .running
        tracker = MlflowTracker(mlflow_server.uri, experiment="test-something")

Helpers for module-scoped fixtures or direct use are imported from the package: ``from tests.helpers.images import
make_image_corpus``, ``from tests.helpers.servers import S3Server``, ``from tests.helpers.recipes import tiny_recipe``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.images import ImageCorpus, make_image_corpus
from tests.helpers.servers import CHROMIUM, CHROMIUM_ARGS, S3_BUCKET, S3_ENV, MlflowServer, S3Server, make_bucket

# --- S3 server -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide moto S3 server subprocess: ``.endpoint_url``, ``.stop()``, ``.start()``, ``.reset()``."""
    server = S3Server(log_path=tmp_path_factory.mktemp("moto") / "moto_server.log")
    server.start()
    yield server
    server.stop()


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


@pytest.fixture
def bad_image_corpus(tmp_path: Path) -> ImageCorpus:
    """A folder with good images (incl. CMYK, 16-bit, palette, RGBA, EXIF-rotated) and every kind of bad input."""
    return make_image_corpus(tmp_path / "corpus")


# --- mlflow ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide ``mlflow server`` subprocess: ``.uri``, ``.stop()``, ``.start()`` (same port, same store)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


# --- headless Chromium (browser tests of the playground and of the MLflow UI) ------------------------------------


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
