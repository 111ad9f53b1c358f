"""Real local services for tests, each a subprocess on 127.0.0.1 that can be stopped and restarted.

- `S3Server`: moto's S3 server (``make_bucket`` creates a bucket on it); state is in memory, a restart empties it.
- `MlflowServer`: ``mlflow server`` on SQLite with proxied artifacts; state is on disk, a restart keeps it.
- `PrefectServer`: ``prefect server start`` on SQLite in its own PREFECT_HOME (no UI, scheduler or telemetry).
- `CHROMIUM`, `CHROMIUM_ARGS`: how the browser tests launch Debian's headless Chromium.

The fixtures in ``tests/conftest.py`` wrap these; modules that need a private instance build one directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the venv's console scripts (moto_server, mlflow, prefect)

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


# --- Prefect ------------------------------------------------------------------------------------------------------


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group of `proc` (it was started with start_new_session), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children (flow-run processes, uvicorn) too
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def http_json(url: str, body: Any | None = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class PrefectServer:
    """``prefect server start`` on 127.0.0.1 with SQLite in ``home`` (PREFECT_HOME); no UI, scheduler or telemetry."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._proc: subprocess.Popen | None = None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) without PREFECT_* settings, plus this server's client settings."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_CLI_PROMPT="false",
        )
        return env

    def start(self, timeout: float = 120.0) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.env()
        env.update(
            PREFECT_SERVER_UI_ENABLED="false",
            PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",  # no cron runs during the test
            PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        )
        env.pop("PREFECT_API_URL")
        cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.home / "server.log", "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.home, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self._proc.returncode}); see {self.home / 'server.log'}")
            with contextlib.suppress(OSError, ValueError):
                if http_json(f"{self.api_url}/health", timeout=2) is True:
                    return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"prefect server did not answer on {self.api_url}/health within {timeout} s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None

    def api(self, path: str, body: Any | None = None) -> Any:
        return http_json(f"{self.api_url}{path}", body)


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
