"""Run context: where a run's code came from (git) and what it ran on (package versions, Python, host).

Recorded as tags on every MLflow run (`run_context_tags`) and as ``git_sha`` in training checkpoints (`git_sha`).
Imports no other ddcolor module at import time.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path

__all__ = ["VERSIONED_PACKAGES", "git_sha", "git_tags", "run_context_tags"]

#: Packages whose versions are recorded as ``version.<name>`` tags on every run.
VERSIONED_PACKAGES = ("torch", "timm", "ddcolor", "mlflow", "numpy")


def _package_dir() -> Path:
    import ddcolor

    return Path(ddcolor.__file__).resolve().parent


def _git(args: list[str], cwd: Path) -> str | None:
    """``git <args>`` in `cwd`: its stripped stdout, or None when git is missing, fails or takes over 5 s."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_sha(where: str | Path | None = None) -> str | None:
    """The commit (``HEAD``) of the git repository holding `where` (default: the ddcolor package), or None."""
    return _git(["rev-parse", "HEAD"], Path(where) if where is not None else _package_dir()) or None


def git_tags() -> dict[str, str]:
    """``git.commit`` / ``git.dirty`` / ``git.branch`` (and MLflow's ``mlflow.source.git.commit``) of the working
    directory's repository, else of the ddcolor package's; {} outside git."""
    for where in (Path.cwd(), _package_dir()):
        commit = git_sha(where)
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], where)
            tags = {"git.commit": commit, "mlflow.source.git.commit": commit}
            if status is not None:
                tags["git.dirty"] = "true" if status else "false"
            branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], where)
            if branch:
                tags["git.branch"] = branch
            return tags
    return {}


def _package_version(name: str) -> str:
    if name == "ddcolor":
        import ddcolor

        return ddcolor.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run_context_tags() -> dict[str, str]:
    """Tags recorded on every run: git commit and dirty flag, package versions, Python version, host."""
    tags = git_tags()
    tags.update({f"version.{name}": _package_version(name) for name in VERSIONED_PACKAGES})
    tags["version.python"] = platform.python_version()
    tags["host"] = socket.gethostname()
    return tags
