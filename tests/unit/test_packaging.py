"""Packaging: the lean core, the extras and their install hints, the metadata (version, license, py.typed).

The slow test installs the core alone (no extra) into a fresh virtualenv, from this machine's package indexes, and
colorizes an image with a random-init model there.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ddcolor
from ddcolor._optional import EXTRA_OF, MissingExtraError, missing_extra, require
from ddcolor.cli import EXIT_MISSING_EXTRA, app

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def _name(requirement: str) -> str:
    """'dvc[s3]>=3.50' -> 'dvc' (PEP 503-normalised)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def _pinned() -> set[str]:
    lines = (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines()
    return {_name(line) for line in lines if "==" in line and not line.lstrip().startswith("#")}


def test_version_has_one_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ddcolor.__version__"}
    assert importlib.metadata.version("ddcolor") == ddcolor.__version__


def test_license_file_matches_metadata_and_py_typed_ships():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert (ROOT / "ddcolor" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["ddcolor"]
    assert PROJECT["urls"]


def test_every_dependency_is_pinned_and_every_optional_module_has_its_extra():
    extras = PROJECT["optional-dependencies"]
    assert {"train", "mlops", "ui", "onnx", "gpu", "dask", "ray", "video", "dev", "all"} <= set(extras)
    requirements = PROJECT["dependencies"] + [r for group in extras.values() for r in group]
    unpinned = {_name(r) for r in requirements if not r.startswith("ddcolor[")} - _pinned()
    assert not unpinned, f"declared but not pinned in constraints.txt: {sorted(unpinned)}"
    assert set(EXTRA_OF.values()) <= set(extras)
    everything = {e for r in extras["all"] for e in r.removeprefix("ddcolor[").rstrip("]").split(",")}
    assert everything == set(extras) - {"all", "dev"}
    core = {_name(r) for r in PROJECT["dependencies"]}
    assert not core & {"mlflow", "prefect", "dvc", "great-expectations", "boto3", "onnxruntime", "pyarrow", "fastapi"}


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not importable, even where it is installed
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'ddcolor[onnx]'")) as info:
        require("onnxruntime", "onnx", "the onnx engine")
    assert isinstance(info.value, ImportError) and info.value.name == "onnxruntime"
    assert "the onnx engine" in str(info.value)
    assert require("json").dumps([1]) == "[1]"  # present modules are returned


def test_require_keeps_errors_that_are_not_a_missing_package(monkeypatch):
    with pytest.raises(ModuleNotFoundError) as info:  # the package is there, a submodule is not: a broken install
        require("json.no_such_submodule", "train")
    assert not isinstance(info.value, MissingExtraError)
    assert missing_extra(ModuleNotFoundError("x", name="lpips")).extra == "train"
    assert missing_extra(ModuleNotFoundError("x", name="some_other_package")) is None


def test_cli_turns_a_missing_extra_into_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    result = CliRunner().invoke(app, ["gate", "--run-id", "0123abcd"])
    assert result.exit_code == EXIT_MISSING_EXTRA, result.output
    assert "pip install 'ddcolor[mlops]'" in result.output
    monkeypatch.setitem(sys.modules, "onnx", None)
    result = CliRunner().invoke(app, ["export-onnx", "--model", str(tmp_path / "m.safetensors"), "-o", "a.onnx"])
    assert result.exit_code == EXIT_MISSING_EXTRA and "pip install 'ddcolor[onnx]'" in result.output


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_core_install_alone_colorizes(tmp_path):
    """`pip install ddcolor` (no extras) into a fresh venv colorizes an image; the heavy stack is absent.

    torch/torchvision come from this machine's local wheel store (as in the Makefile); everything is constrained by
    constraints.txt. About 3 minutes on 2 cores, most of it copying the torch + CUDA wheels.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [
        str(python),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "-c",
        str(ROOT / "constraints.txt"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    subprocess.run([*pip, "torch==2.14.1", "torchvision==0.29.1"], check=True, env=env)
    source = tmp_path / "src"  # a copy: setuptools would leave build/ in the checkout
    shutil.copytree(ROOT / "ddcolor", source / "ddcolor", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    subprocess.run([*pip, str(source)], check=True, env=env)
    names = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(*sorted({d.metadata['Name'] for d in m.distributions()}))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    lowered = {n.lower() for n in names}
    assert "ddcolor" in lowered and "torch" in lowered and "timm" in lowered
    assert not lowered & {"mlflow", "prefect", "dvc", "great-expectations", "onnxruntime", "pyarrow", "boto3"}
    print(f"core install: {len(names)} distributions")  # the README quotes this number
    assert len(names) < 100

    from PIL import Image

    Image.new("L", (48, 40), 128).save(tmp_path / "gray.png")
    cli = venv / "bin" / "ddcolor"
    run = subprocess.run(
        [
            str(cli),
            "colorize",
            str(tmp_path / "gray.png"),
            "-o",
            str(tmp_path / "out"),
            "--random-init",
            "--input-size",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "out" / "gray.png") as out:
        assert out.size == (48, 40) and out.mode == "RGB"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and ddcolor.__version__ in version.stdout
    onnx = subprocess.run(
        [str(cli), "export-onnx", "--random-init", "-o", str(tmp_path / "a.onnx")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert onnx.returncode == EXIT_MISSING_EXTRA and "pip install 'ddcolor[onnx]'" in onnx.stderr
