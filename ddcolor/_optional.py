"""Optional dependencies: one place that maps a module to the ``ddcolor[extra]`` that installs it.

The core install (``pip install ddcolor``) colorizes images and fetches weights; training, the MLOps stack, the
playground, ONNX, GPU metrics, Dask/Ray and video are extras. Code that needs one imports it through
:func:`require`, so a missing extra is an error that says which ``pip install`` to run instead of a bare
``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ddcolor.errors import DDColorError

# top-level module -> extra that installs it (pyproject.toml [project.optional-dependencies])
EXTRA_OF: dict[str, str] = {
    "pyarrow": "train",
    "pandas": "train",
    "skimage": "train",
    "scipy": "train",
    "lpips": "train",
    "pytorch_fid": "train",
    "psutil": "train",
    "s3fs": "train",
    "mlflow": "mlops",
    "prefect": "mlops",
    "dvc": "mlops",
    "great_expectations": "mlops",
    "boto3": "mlops",
    "botocore": "mlops",
    "fastapi": "ui",
    "uvicorn": "ui",
    "starlette": "ui",
    "multipart": "ui",
    "python_multipart": "ui",
    "onnx": "onnx",
    "onnxruntime": "onnx",
    "onnxscript": "onnx",
    "pynvml": "gpu",
    "dask": "dask",
    "distributed": "dask",
    "prefect_dask": "dask",
    "ray": "ray",
    "prefect_ray": "ray",
    "av": "video",
    "cv2": "video",
}


class MissingExtraError(DDColorError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that adds it."""

    def __init__(self, module: str, extra: str, purpose: str | None = None) -> None:
        self.module, self.extra = module, extra
        what = f" ({purpose})" if purpose else ""
        super().__init__(
            f"{module} is not installed: it comes with the '{extra}' extra{what}. "
            f"Install it with: pip install 'ddcolor[{extra}]'",
            name=module,
        )


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise :class:`MissingExtraError` naming the extra.

    Args:
        module: what to import, e.g. ``"onnxruntime"`` or ``"mlflow.exceptions"``.
        extra: the ``ddcolor[...]`` extra that installs it; default: looked up in :data:`EXTRA_OF`.
        purpose: a few words on what needs it, added to the message (e.g. ``"ONNX export"``).
    """
    top = module.split(".", 1)[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name.split(".", 1)[0] if e.name else None
        # Only a missing package is translated (the one asked for, or an optional one it needs); a broken
        # install (a package present but a submodule missing) keeps its own error.
        if missing is None or (missing != top and missing not in EXTRA_OF) or importlib.util.find_spec(missing):
            raise
        which = extra if (missing == top and extra) else EXTRA_OF.get(missing, extra or "all")
        raise MissingExtraError(missing, which, purpose) from e


def missing_extra(exc: BaseException) -> MissingExtraError | None:
    """The :class:`MissingExtraError` behind ``exc`` (itself, or a ``ModuleNotFoundError`` of a known optional
    package), or None: lets the CLI turn an import failure deep in a command into the install hint."""
    if isinstance(exc, MissingExtraError):
        return exc
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".", 1)[0]
        if top in EXTRA_OF:
            return MissingExtraError(top, EXTRA_OF[top])
    return None
