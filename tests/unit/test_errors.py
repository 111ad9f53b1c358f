"""One error base: every ddcolor exception is a `DDColorError` and keeps its older standard base."""

from __future__ import annotations

import pytest

from ddcolor.errors import DDColorError


def _classes() -> list[tuple[type[BaseException], type[BaseException]]]:
    """(class, the standard base it had before DDColorError), for the library's exception classes."""
    from ddcolor._optional import MissingExtraError
    from ddcolor.archive import ArchiveError
    from ddcolor.config import ConfigError
    from ddcolor.data.ingest import IngestError
    from ddcolor.data.loader import ShardError
    from ddcolor.data.manifest import ManifestError
    from ddcolor.imageio import ImageReadError
    from ddcolor.model.convert import CheckpointError
    from ddcolor.pipeline import ValidationFailed
    from ddcolor.registry import RegistryError
    from ddcolor.registry_lock import LockLostError, LockTimeoutError
    from ddcolor.storage import StorageError, StorageNotFoundError
    from ddcolor.tracking import TrackingError
    from ddcolor.train.checkpoint import CheckpointCorruptError, CheckpointWriteError, NoIntactCheckpointError
    from ddcolor.train.trainer import TrainingDivergedError, TrainingStopped
    from ddcolor.ui.models import ModelSpecError
    from ddcolor.weights import UnknownWeightsError, WeightsError, WeightsIntegrityError, WeightsNotFoundError

    return [
        (CheckpointError, ValueError),
        (ConfigError, ValueError),
        (ShardError, ValueError),
        (ManifestError, ValueError),
        (ModelSpecError, ValueError),
        (StorageError, Exception),
        (StorageNotFoundError, FileNotFoundError),
        (IngestError, Exception),
        (WeightsError, Exception),
        (UnknownWeightsError, ValueError),
        (WeightsNotFoundError, FileNotFoundError),
        (WeightsIntegrityError, ValueError),
        (ImageReadError, Exception),
        (TrainingDivergedError, RuntimeError),
        (TrainingStopped, RuntimeError),
        (RegistryError, RuntimeError),
        (TrackingError, RuntimeError),
        (ValidationFailed, RuntimeError),
        (MissingExtraError, ImportError),
        (ArchiveError, RuntimeError),
        (LockTimeoutError, RuntimeError),
        (LockLostError, RuntimeError),
        (CheckpointWriteError, RuntimeError),
        (CheckpointCorruptError, ValueError),
        (NoIntactCheckpointError, ValueError),
    ]


@pytest.mark.parametrize(("cls", "old_base"), _classes(), ids=lambda c: c.__name__)
def test_every_library_error_is_a_ddcolor_error_and_keeps_its_old_base(cls, old_base):
    assert issubclass(cls, DDColorError)
    assert issubclass(cls, old_base)  # existing `except ValueError` / `except FileNotFoundError` still catch it


def test_one_except_catches_what_the_library_raises(tmp_path):
    from ddcolor.config import load_config
    from ddcolor.data.manifest import read_manifest

    with pytest.raises(DDColorError, match=r"train\.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(DDColorError, match=r"manifest\.json"):
        read_manifest(str(tmp_path))


def test_every_exception_class_in_the_package_is_a_ddcolor_error():
    """Scans the tracked sources, so an exception class added later without the base fails here."""
    import ast
    import importlib
    import subprocess
    from pathlib import Path

    from ddcolor._optional import MissingExtraError

    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(
        ["git", "ls-files", "ddcolor/*.py", "ddcolor/**/*.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    found = []
    for rel in files:
        tree = ast.parse((root / rel).read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.bases]
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        for name in names:
            try:
                cls = getattr(importlib.import_module(module), name)
            except MissingExtraError:
                continue  # e.g. ddcolor.video without the video extra
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
                assert issubclass(cls, DDColorError), f"{rel}: {name} does not derive from DDColorError"
    assert len(found) >= 25  # the scan saw the package's exception classes
