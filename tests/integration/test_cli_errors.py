"""Errors, not tracebacks (issue #18): each class of expected failure, driven through the real `ddcolor` command,
ends in one or two lines that name the file or service and what to do, with the documented exit code; `-v` shows the
traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # each case starts a fresh interpreter (~2-4 s)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def ddcolor(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    environment.update(env, DDCOLOR_NO_DOTENV="1")
    return subprocess.run(
        [sys.executable, "-m", "ddcolor.cli", *args], cwd=cwd, env=environment, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without log records (lines starting with a timestamp)."""
    return [line for line in result.stderr.splitlines() if line.strip() and not line[:4].isdigit()]


@pytest.fixture
def work(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 24), (200, 100, 50)).save(tmp_path / "a.png")
    (tmp_path / "src").mkdir()
    Image.new("RGB", (32, 24), (20, 100, 50)).save(tmp_path / "src" / "b.png")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "bad.yaml").write_text("train:\n  lr: -1\n")
    return tmp_path


def test_corrupt_and_missing_model_files(work):
    corrupt = ddcolor("colorize", "a.png", "-o", "out", "--model", "corrupt.safetensors", cwd=work)
    assert corrupt.returncode == 1 and "Traceback" not in corrupt.stderr
    assert len(error_lines(corrupt)) <= 2 and "corrupt.safetensors" in corrupt.stderr and "corrupt" in corrupt.stderr
    missing = ddcolor("colorize", "a.png", "-o", "out", "--model", "nope.safetensors", cwd=work)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert len(error_lines(missing)) <= 2 and "nope.safetensors" in missing.stderr and "weights list" in missing.stderr


def test_bad_config_names_the_key(work):
    result = ddcolor("train", "--config", "bad.yaml", cwd=work)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # 2: usage, as the README's exit-code table
    assert len(error_lines(result)) <= 2 and "bad.yaml" in result.stderr and "train.lr" in result.stderr


def test_unreachable_mlflow_fails_at_once_in_one_line(work):
    uri = f"http://user:secret@127.0.0.1:{_closed_port()}"
    for command in (["gate", "--run-id", "abc"], ["promote", "--run-id", "abc"]):
        result = ddcolor(*command, cwd=work, MLFLOW_TRACKING_URI=uri)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        lines = error_lines(result)
        assert len(lines) == 1 and "is not reachable" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0]
        assert "secret" not in result.stderr  # the password is redacted
    verbose = ddcolor("-v", "gate", "--run-id", "abc", cwd=work, MLFLOW_TRACKING_URI=uri)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "TrackingError" in verbose.stderr


def test_unreachable_s3_names_the_endpoint(work):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = ddcolor(
        "ingest", "src", "data.shards_uri=s3://bucket/ds", cwd=work,
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_MAX_ATTEMPTS="1",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = error_lines(result)
    assert len(lines) <= 2 and endpoint in lines[-1] and "AWS_ENDPOINT_URL" in lines[-1]
