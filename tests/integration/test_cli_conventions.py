"""CLI conventions: --version, --json (machine-readable stdout), .env loading, shell completion, exit codes.

--json of validate, evaluate, gate and promote is tested next to each command's other CLI tests (test_validate,
test_metrics, test_registry); the weights list here.
"""

from __future__ import annotations

import json

from typer.testing import CliRunner

import ddcolor
from ddcolor import weights
from ddcolor.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"ddcolor {ddcolor.__version__}"


def test_shell_completion_is_offered():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_weights_list_json_is_the_only_stdout(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ddcolor_paper_tiny.pth").write_bytes(b"x" * 10)
    result = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing else on stdout
    assert doc["cache_dir"] == str(tmp_path / "cache")
    rows = {r["name"]: r for r in doc["weights"]}
    assert set(rows) == set(weights.REGISTRY)
    assert rows["ddcolor_paper_tiny"]["present"] is True and rows["ddcolor_paper_tiny"]["size_bytes"] == 10
    assert rows["ddcolor_paper"]["present"] is False and rows["ddcolor_paper"]["verified"] is None
    (tmp_path / "cache" / "vgg16_bn-6c64b313.pth").write_bytes(b"not vgg")  # fails its name's sha256 prefix
    corrupt = CliRunner().invoke(app, ["weights", "list", "--json", "--verify"])
    assert corrupt.exit_code == 1
    assert {r["name"]: r["verified"] for r in json.loads(corrupt.stdout)["weights"]}["vgg16_bn"] is False


def test_dotenv_is_loaded_at_start_without_overriding_the_environment(tmp_path, monkeypatch):
    """`.env` in the working directory sets variables for the command (as `.env.example` describes); variables that
    are already set win, and DDCOLOR_NO_DOTENV=1 skips the file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(weights.ENV_VAR, raising=False)
    monkeypatch.delenv("DDCOLOR_NO_DOTENV", raising=False)
    (tmp_path / ".env").write_text(f"# comment\n{weights.ENV_VAR}={tmp_path / 'from-dotenv'}\n")
    try:
        result = CliRunner().invoke(app, ["weights", "list", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["cache_dir"] == str(tmp_path / "from-dotenv")
    finally:
        monkeypatch.delenv(weights.ENV_VAR, raising=False)  # loaded into this process's environment
    monkeypatch.setenv(weights.ENV_VAR, str(tmp_path / "from-env"))
    result = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert json.loads(result.stdout)["cache_dir"] == str(tmp_path / "from-env")
    monkeypatch.delenv(weights.ENV_VAR)
    monkeypatch.setenv("DDCOLOR_NO_DOTENV", "1")
    result = CliRunner().invoke(app, ["weights", "list", "--json"])
    assert json.loads(result.stdout)["cache_dir"] != str(tmp_path / "from-dotenv")
