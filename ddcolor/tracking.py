"""Experiment tracking in MLflow (mlflow is imported lazily, so importing this module is cheap).

The trainer talks to a :class:`Tracker`; :class:`MlflowTracker` sends everything to an MLflow tracking server or
store, :class:`NullTracker` drops it (tracking off, tests). Usage::

    tracker = start_tracker(cfg, run_name="nightly")      # MLflow run + every param of params.yaml
    tracker.set_tags(dataset_version(cfg.data.shards_uri).as_tags())
    for step in ...:
        tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/images_per_s": ips}, step=step)
    tracker.log_image(grid_uint8_hwc, key="val_samples", step=step)
    uri = tracker.log_model(save_checkpoint(generator, "checkpoints/generator"))   # "models:/m-..."
    tracker.finish()                                       # or finish("FAILED") in an except block

Failure policy:

* At start, an unreachable server is a :class:`TrackingError` within ``timeout_s``, naming the URI and what to check
  (a ``GET {uri}/health`` runs before any MLflow call: MLflow's own client would retry for minutes).
* After start, logging never raises into the training loop. When the server goes away, one warning line
  ``tracking server unreachable; continuing without tracking (run <id> marked in logs)`` is logged, calls are
  dropped and counted (:attr:`MlflowTracker.dropped_calls`), and every ``reconnect_every_s`` a health check decides
  whether to resume. Other failures (e.g. an invalid metric name) are logged as warnings and dropped.
  ``finish()`` never raises either. (:meth:`MlflowTracker.log_model` raises ``FileNotFoundError`` for a missing local
  checkpoint: that is a bug in the caller, not a tracking outage.)
* Every MLflow HTTP request made by the tracker runs with one retry and a request timeout of ``timeout_s``
  (``artifact_timeout_s`` for artifact and model uploads), so a hung server blocks a training step for at most about
  ``2 * timeout_s`` once, then not at all; a refused connection costs milliseconds.

The final generator is logged as an MLflow ``LoggedModel`` (pyfunc flavor, :class:`DDColorPyfunc`): artifacts
``checkpoint`` (safetensors) and ``config`` (JSON), a tensor signature uint8 (B,H,W,3) RGB images -> uint8
(B,H,W,3) colorized images (param ``input_size``, default 512); load it with ``mlflow.pyfunc.load_model(uri)`` or
serve it with ``mlflow models serve -m <uri>``. The same two files are also run artifacts
under ``checkpoint/``, and the run gets the tag ``ddcolor.model_uri``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from ddcolor.config import Config

__all__ = [
    "DDColorPyfunc",  # noqa: F822 - defined on first access (module __getattr__), as it subclasses an mlflow class
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "model_signature",
    "run_context_tags",
    "start_tracker",
]

log = logging.getLogger(__name__)

#: Packages whose versions are recorded as ``version.<name>`` tags on every run.
VERSIONED_PACKAGES = ("torch", "timm", "ddcolor", "mlflow", "numpy")
#: Run statuses accepted by :meth:`Tracker.finish`.
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"
# MLflow's limits (mlflow.utils.validation); used only when that module cannot be imported.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

_psutil_warned = False
# MLflow's advice that does not apply to a tensor model logged with an explicit signature.
_QUIET_MODEL_WARNINGS = (".*An input example was not provided.*",)


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used at start (the message names the URI and what to check)."""


@runtime_checkable
class Tracker(Protocol):
    """What the trainer logs to. Implementations never raise from logging calls or `finish`."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, or None when nothing is tracked."""
        ...

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values are stringified and truncated to MLflow's limit)."""
        ...

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values are stringified and truncated to MLflow's limit)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at a training step."""
        ...

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Log a uint8 HxWx3 image as step `step` of the image series `key`."""
        ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a folder's contents) as run artifact(s) under `artifact_path`."""
        ...

    def log_model(self, model_dir_or_checkpoint: Path, name: str = "generator") -> str | None:
        """Log a generator checkpoint as an MLflow model; return its URI (``models:/m-...``) or None."""
        ...

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED); later calls do nothing."""
        ...


class NullTracker:
    """A `Tracker` that records nothing (tracking off, tests)."""

    @property
    def run_id(self) -> str | None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_model(self, model_dir_or_checkpoint: Path, name: str = "generator") -> str | None:
        return None

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


# --- helpers -----------------------------------------------------------------------------------------------


def _run_tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _redact(uri: str) -> str:
    """The URI with any password replaced by ``***``."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _health_problem(uri: str, timeout: float) -> str | None:
    """None when ``GET {uri}/health`` answers like an MLflow server does, else what went wrong."""
    parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    netloc = parts.hostname or ""
    netloc = f"[{netloc}]" if ":" in netloc else netloc
    url = urllib.parse.urlunsplit(parts._replace(netloc=f"{netloc}:{parts.port}" if parts.port else netloc))
    request = urllib.request.Request(url)
    if parts.username:  # urllib does not take credentials from the URL
        token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(256)
        return None
    except urllib.error.HTTPError as err:
        if err.code in (401, 407):  # an auth proxy answered; MLflow's client sends the credentials
            return None
        hint = ""
        if err.code in (400, 403):
            hint = " (the server may reject this Host header: start it with --allowed-hosts including this host)"
        return f"GET {url} answered HTTP {err.code} {err.reason}{hint}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"GET {url} failed: {reason}"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _git_tags() -> dict[str, str]:
    """``git.commit`` / ``git.dirty`` of the working directory's repository, else of the ddcolor package's."""
    import ddcolor

    for where in (Path.cwd(), Path(ddcolor.__file__).resolve().parent):
        commit = _git(["rev-parse", "HEAD"], where)
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
    tags = _git_tags()
    tags.update({f"version.{name}": _package_version(name) for name in VERSIONED_PACKAGES})
    tags["version.python"] = platform.python_version()
    tags["host"] = socket.gethostname()
    return tags


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _limits() -> tuple[int, int, int, int]:
    """(max param value length, max tag value length, params/tags per batch, metrics per batch)."""
    try:
        from mlflow.utils import validation as v

        return v.MAX_PARAM_VAL_LENGTH, v.MAX_TAG_VAL_LENGTH, v.MAX_PARAMS_TAGS_PER_BATCH, v.MAX_METRICS_PER_BATCH
    except (ImportError, AttributeError):  # pragma: no cover - other MLflow versions
        return _MAX_PARAM_VAL_LENGTH, _MAX_TAG_VAL_LENGTH, _MAX_PARAMS_TAGS_PER_BATCH, _MAX_METRICS_PER_BATCH


def _mlflow_context_tags() -> dict[str, str]:
    """MLflow's own run-context tags (``mlflow.user``, ``mlflow.source.name``, ...), as ``mlflow.start_run`` sets."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception as err:  # pragma: no cover - private-ish API of other MLflow versions
        log.debug("no MLflow context tags: %s", err)
        return {}


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` only inside the block (``Model.log`` reads it).

    The environment variable ``MLFLOW_TRACKING_URI`` is the same afterwards as before: MLflow's own helper restores
    its global URI, and restoring it to "never set" (None) *unsets* the variable (``set_tracking_uri(None)``), which
    would send every later call in this process (e.g. evaluation after training in one flow run) to the default
    ``sqlite:///mlflow.db``.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        try:
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use
        except ImportError:  # pragma: no cover - other MLflow versions: set it for good
            import mlflow

            mlflow.set_tracking_uri(uri)
            yield
            return
        with use(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _resolve_checkpoint(path: Path, name: str) -> Path:
    """The ``.safetensors`` file to log: `path` itself, or the one in folder `path` (``<name>.safetensors`` wins)."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        preferred = path / f"{name}.safetensors"
        if preferred.is_file():
            return preferred
        if len(candidates) == 1:
            return candidates[0]
        raise FileNotFoundError(
            f"{path}: expected one .safetensors checkpoint (or {preferred.name}), found "
            f"{[c.name for c in candidates] or 'none'}"
        )
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (save it with ddcolor.model.checkpoint.save_checkpoint)")
    return path


def _checkpoint_config(checkpoint: Path, tmp: Path) -> Path:
    """The JSON config beside `checkpoint`, or one written into `tmp` from the safetensors metadata."""
    sidecar = checkpoint.with_suffix(".json")
    if sidecar.is_file():
        return sidecar
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "ddcolor" not in metadata:
        raise FileNotFoundError(f"{checkpoint}: no {sidecar.name} beside it and no config in its metadata")
    out = tmp / sidecar.name
    out.write_text(json.dumps(json.loads(metadata["ddcolor"]), indent=2) + "\n")
    return out


def model_signature() -> Any:
    """The pyfunc signature: uint8 (B,H,W,3) RGB images -> uint8 (B,H,W,3) colorized RGB; B, H, W free.

    Param ``input_size`` (int, default 512): side of the square network input (a multiple of 32).
    """
    import numpy as np
    from mlflow.models import infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    example = np.zeros((1, 8, 8, 3), np.uint8)
    signature = infer_signature(example, example, params={"input_size": 512})
    signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    signature.outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    return signature


# --- pyfunc model ------------------------------------------------------------------------------------------


def _make_pyfunc_class() -> type:
    """Define `DDColorPyfunc` (it subclasses an mlflow class, so it is built on first use, not at import)."""
    if "DDColorPyfunc" in globals():
        return globals()["DDColorPyfunc"]
    import mlflow.pyfunc

    class DDColorPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc wrapper of a DDColor generator checkpoint.

        Artifacts: ``checkpoint`` (our ``.safetensors``) and ``config`` (its JSON). ``predict`` takes

        * images: uint8 (B, H, W, 3) RGB or (B, H, W) gray, any H, W (one size per batch) -> colorized uint8
          (B, H, W, 3) RGB through `ddcolor.colorize.Colorizer` (param ``input_size``, default 512), or
        * the network contract: float32 (B, 3, H, W) gray RGB in [0, 1] (H, W multiples of 32) -> ab
          (B, 2, H, W) float32, exactly like ``DDColor.forward``.

        The logged signature declares the image contract (uint8 (B, H, W, 3)), which ``PyFuncModel.predict`` and
        ``mlflow models serve`` enforce; the other two inputs reach ``unwrap_python_model().predict(None, x)``.
        """

        # The model has a tensor signature; no type-hint based input validation (and no warning asking for hints).
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            import torch

            from ddcolor.model.checkpoint import load_checkpoint

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(device)
            self.model = load_checkpoint(context.artifacts["checkpoint"]).eval().to(self.device)
            self._colorizers: dict[int, Any] = {}

        def _colorizer(self, input_size: int) -> Any:
            from ddcolor.colorize import Colorizer

            colorizers = self.__dict__.setdefault("_colorizers", {})
            if input_size not in colorizers:
                colorizers[input_size] = Colorizer(
                    self.model, input_size=input_size, device=str(self.device), batch_size=8
                )
            return colorizers[input_size]

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate by them
            import numpy as np
            import torch

            x = np.asarray(model_input)
            if np.issubdtype(x.dtype, np.floating) and x.ndim in (3, 4) and x.shape[-3] == 3:
                # the network contract: (B, 3, H, W) (or one (3, H, W)) gray RGB in [0, 1] -> ab
                x = np.ascontiguousarray(x, dtype=np.float32)
                if x.ndim == 3:
                    x = x[None]
                with torch.inference_mode():
                    ab = self.model(torch.from_numpy(x).to(self.device))
                return ab.float().cpu().numpy()
            if x.ndim == 4 and x.shape[-1] == 1:
                x = x[..., 0]
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
                raise ValueError(
                    f"expected uint8 (B, H, W, 3) RGB or (B, H, W) gray images, or float32 (B, 3, H, W) gray RGB; "
                    f"got {x.dtype} {x.shape}"
                )
            if x.dtype != np.uint8:
                if np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 255:
                    raise ValueError(f"images must be uint8 (0..255), got {x.dtype}")
                x = x.astype(np.uint8)
            input_size = int((params or {}).get("input_size", 512) or 512)
            colored = self._colorizer(input_size).colorize_batch(list(x))
            return np.stack(colored).astype(np.uint8, copy=False)

    DDColorPyfunc.__module__ = __name__
    DDColorPyfunc.__qualname__ = "DDColorPyfunc"
    globals()["DDColorPyfunc"] = DDColorPyfunc  # importable by reference, so cloudpickle stores no code
    return DDColorPyfunc


def __getattr__(name: str) -> Any:
    if name == "DDColorPyfunc":
        return _make_pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- MLflow tracker ----------------------------------------------------------------------------------------


class MlflowTracker:
    """A `Tracker` that logs one MLflow run (see the module docstring for the failure policy).

    Args:
        tracking_uri: MLflow server (``http(s)://...``) or store (``sqlite:///...``); None reads
            ``MLFLOW_TRACKING_URI`` via `ddcolor.config.EnvSettings` (default ``sqlite:///mlflow.db`` in the working
            directory).
        experiment: experiment name (created when missing).
        run_name: MLflow run name (None: MLflow picks one).
        log_system_metrics: sample CPU/memory/disk/network (and GPU with pynvml) every 10 s as ``system/*`` metrics
            (needs psutil; without it a warning is logged once).
        timeout_s: health-check and per-request timeout, seconds.
        tags: extra tags set at start (e.g. ``dataset_version(...).as_tags()``).
        reconnect_every_s: while the server is unreachable, check at most this often whether it is back.
        artifact_timeout_s: per-request timeout for artifact and model uploads (big files through the server).
        run_id: attach to this existing run instead of creating one (e.g. evaluation logging ``val/*`` metrics
            into the training run that produced the model); ``experiment`` and ``run_name`` are then ignored.

    Raises:
        TrackingError: the server/store cannot be reached or the run cannot be created.

    MLflow's process-wide tracking URI is left alone (it is set to `tracking_uri` only while logging the model).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "ddcolor",
        run_name: str | None = None,
        *,
        log_system_metrics: bool = True,
        timeout_s: float = 10,
        tags: Mapping[str, Any] | None = None,
        reconnect_every_s: float = 30.0,
        artifact_timeout_s: float = 600.0,
        run_id: str | None = None,
    ) -> None:
        if tracking_uri is None:
            from ddcolor.config import EnvSettings

            tracking_uri = EnvSettings.from_env().mlflow_tracking_uri
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.timeout_s = float(timeout_s)
        self.reconnect_every_s = float(reconnect_every_s)
        self.artifact_timeout_s = max(float(artifact_timeout_s), self.timeout_s)
        self.experiment_id: str | None = None
        #: Logging calls dropped because the server was unreachable.
        self.dropped_calls = 0
        #: Logging calls that failed for another reason (logged as warnings).
        self.failed_calls = 0
        #: False while the server is considered unreachable.
        self.reachable = True
        self._run_id: str | None = None
        self._finished = False
        self._last_attempt = 0.0
        self._last_step = 0
        self._warned: set[str] = set()
        self._lock = threading.RLock()
        self._monitor: Any = None
        self._system_metrics = log_system_metrics
        self._http = _is_http(tracking_uri)
        shown = _redact(tracking_uri)

        if self._http:
            problem = _health_problem(tracking_uri, self.timeout_s)
            if problem:
                raise TrackingError(
                    f"MLflow tracking server {shown} is unreachable: {problem}. Check that the server is running "
                    "and reachable from here (`mlflow server --host ... --port ...`), that MLFLOW_TRACKING_URI (or "
                    "the tracking URI passed in) is right, and that the server's --allowed-hosts accepts this host; "
                    "or run with tracking disabled."
                )
        try:
            with self._quick_http():
                import mlflow

                self._client = mlflow.MlflowClient(tracking_uri)
                if run_id is not None:
                    run = self._client.get_run(run_id)
                    self.experiment_id = run.info.experiment_id
                    if tags:
                        self._client.log_batch(run_id, tags=_run_tags(self._tag_values(tags)), synchronous=True)
                else:
                    self.experiment_id = self._experiment_id(experiment)
                    start_tags = _mlflow_context_tags()
                    start_tags.update(run_context_tags())
                    start_tags.update({k: _stringify(v) for k, v in (tags or {}).items()})
                    run = self._client.create_run(
                        self.experiment_id, run_name=run_name, tags=self._tag_values(start_tags)
                    )
        except TrackingError:
            raise
        except Exception as err:
            what = (
                f"open MLflow run {run_id}"
                if run_id is not None
                else f"start an MLflow run (experiment {experiment!r})"
            )
            raise TrackingError(f"cannot {what} on {shown}: {type(err).__name__}: {err}") from err
        self._run_id = run.info.run_id
        atexit.register(self._at_exit)
        log.info(
            "MLflow run %s (%s)%s on %s",
            self._run_id,
            run.info.run_name,
            " (attached)" if run_id is not None else f" in experiment {experiment!r}",
            shown,
        )
        if log_system_metrics:
            self._start_system_metrics(resume=False)

    # --- public API ---

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        max_len, _, per_batch, _ = _limits()
        items = [Param(str(k), _truncate(_stringify(v), max_len)) for k, v in params.items()]

        def send() -> None:
            for chunk in _chunks(items, per_batch):
                self._client.log_batch(self._run_id, params=chunk, synchronous=True)

        self._guarded("log_params", send)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in self._tag_values(tags).items()]
        per_batch = _limits()[2]

        def send() -> None:
            for chunk in _chunks(items, per_batch):
                self._client.log_batch(self._run_id, tags=chunk, synchronous=True)

        self._guarded("set_tags", send)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                items.append(Metric(str(key), float(value), timestamp, int(step)))
            except (TypeError, ValueError):
                self._warn_once(f"metric:{key}", "metric %r=%r is not a number; not logged", key, value)
        self._last_step = max(self._last_step, int(step))
        per_batch = _limits()[3]

        def send() -> None:
            for chunk in _chunks(items, per_batch):
                self._client.log_batch(self._run_id, metrics=chunk, synchronous=True)

        if items:
            self._guarded("log_metrics", send)

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        import numpy as np

        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            self._warn_once(
                f"image:{key}", "image %r: expected uint8 HxWx3, got %s %s; not logged", key, array.dtype, array.shape
            )
            return

        def send() -> None:
            try:
                self._client.log_image(self._run_id, array, key=key, step=int(step), synchronous=True)
            except TypeError:  # an MLflow without time-stepped images: a plain artifact named by the step
                self._client.log_image(self._run_id, array, artifact_file=f"images/{key}/step_{int(step):09d}.png")

        self._guarded("log_image", send)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)

        def send() -> None:
            if path.is_dir():
                self._client.log_artifacts(self._run_id, str(path), artifact_path)
            else:
                self._client.log_artifact(self._run_id, str(path), artifact_path)

        self._guarded("log_artifact", send, timeout_s=self.artifact_timeout_s)

    def log_model(self, model_dir_or_checkpoint: Path, name: str = "generator") -> str | None:
        """Log a generator checkpoint as an MLflow pyfunc model (see :class:`DDColorPyfunc`).

        Args:
            model_dir_or_checkpoint: a ``.safetensors`` checkpoint from `save_checkpoint` (its ``.json`` beside it
                is used when present), or a folder holding ``<name>.safetensors`` or exactly one checkpoint.
            name: the LoggedModel's name.

        Returns:
            The model URI (``models:/m-...``), or None when it could not be logged (warning logged).

        Raises:
            FileNotFoundError: no such checkpoint.
        """
        checkpoint = _resolve_checkpoint(Path(model_dir_or_checkpoint), name)
        with tempfile.TemporaryDirectory(prefix="ddcolor-model-") as tmp:
            config = _checkpoint_config(checkpoint, Path(tmp))

            def send() -> str:
                self._client.log_artifact(self._run_id, str(checkpoint), "checkpoint")
                self._client.log_artifact(self._run_id, str(config), "checkpoint")
                logged = self._client.create_logged_model(
                    experiment_id=self.experiment_id,
                    name=name,
                    source_run_id=self._run_id,
                    model_type="ddcolor-generator",
                    tags={"ddcolor.checkpoint": checkpoint.name},
                )
                with _use_tracking_uri(self.tracking_uri), warnings.catch_warnings():
                    for text in _QUIET_MODEL_WARNINGS:
                        warnings.filterwarnings("ignore", message=text, category=UserWarning)
                    info = self._log_pyfunc(logged.model_id, checkpoint, config, name)
                self._client.set_tag(self._run_id, "ddcolor.model_uri", info.model_uri)
                return info.model_uri

            uri = self._guarded("log_model", send, timeout_s=self.artifact_timeout_s)
        if uri:
            log.info("logged model %s (run %s)", uri, self._run_id)
        return uri

    def _log_pyfunc(self, model_id: str, checkpoint: Path, config: Path, name: str) -> Any:
        """``mlflow.pyfunc.log_model`` for our run without making it the active run (``Model.log`` takes run_id)."""
        import mlflow.pyfunc
        from mlflow.models import Model

        import ddcolor

        return Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=self._run_id,
            model_id=model_id,
            step=self._last_step,
            python_model=_make_pyfunc_class()(),
            artifacts={"checkpoint": str(checkpoint), "config": str(config)},
            signature=model_signature(),
            pip_requirements=[f"ddcolor=={ddcolor.__version__}"],
        )

    def finish(self, status: str = "FINISHED") -> None:
        with self._lock:
            if self._finished or self._run_id is None:
                return
            self._finished = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._at_exit)
        try:
            status = str(status).upper()
            if status not in RUN_STATUSES:
                log.warning("unknown run status %r; using FAILED (expected one of %s)", status, RUN_STATUSES)
                status = "FAILED"
            with self._lock:
                reachable = self.reachable or self._try_reconnect(force=True)
            self._stop_system_metrics(wait=reachable)

            def send() -> bool:
                if self.dropped_calls or self.failed_calls:
                    self._client.set_tag(self._run_id, "tracking.dropped_calls", str(self.dropped_calls))
                    self._client.set_tag(self._run_id, "tracking.failed_calls", str(self.failed_calls))
                self._client.set_terminated(self._run_id, status)
                return True

            if reachable and self._call("finish", send):
                if self.dropped_calls:
                    log.warning(
                        "run %s ended %s; %d logging calls were dropped", self._run_id, status, self.dropped_calls
                    )
            elif not self.reachable:
                log.warning(
                    "tracking server %s unreachable; run %s left RUNNING there, not %s (%d logging calls dropped)",
                    _redact(self.tracking_uri),
                    self._run_id,
                    status,
                    self.dropped_calls,
                )
            else:
                log.warning(
                    "could not mark run %s %s (%d logging calls dropped)", self._run_id, status, self.dropped_calls
                )
        except Exception as err:  # finish() never raises
            log.warning("could not end MLflow run %s: %s", self._run_id, err)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    # --- internals ---

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name)
            except MlflowException:  # created concurrently by another process
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} on {_redact(self.tracking_uri)} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use another name"
            )
        return experiment.experiment_id

    def _tag_values(self, tags: Mapping[str, Any]) -> dict[str, str]:
        max_len = _limits()[1]
        return {str(k): _truncate(_stringify(v), max_len) for k, v in tags.items()}

    @contextlib.contextmanager
    def _quick_http(self, timeout_s: float | None = None) -> Iterator[None]:
        """Few retries and a short timeout for MLflow's HTTP client (its defaults retry for minutes)."""
        values = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s or self.timeout_s))),
        }
        with self._lock:
            saved = {name: os.environ.get(name) for name in values}
            os.environ.update(values)
            try:
                yield
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value

    def _guarded(self, what: str, send: Any, timeout_s: float | None = None) -> Any:
        """Run a logging call unless the run is over or the server is (still) unreachable; never raise."""
        with self._lock:
            if self._finished or self._run_id is None:
                log.debug("%s after the run ended; ignored", what)
                return None
            if not self.reachable and not self._try_reconnect():
                self.dropped_calls += 1
                return None
            return self._call(what, send, timeout_s)

    def _call(self, what: str, send: Any, timeout_s: float | None = None) -> Any:
        with self._lock:
            try:
                with self._quick_http(timeout_s):
                    return send()
            except Exception as err:
                problem = _health_problem(self.tracking_uri, min(self.timeout_s, 3.0)) if self._http else None
                if problem:
                    self._mark_unreachable(problem)
                    self.dropped_calls += 1
                else:
                    self.failed_calls += 1
                    self._warn_once(f"call:{what}", "MLflow %s failed for run %s: %s", what, self._run_id, err)
                return None

    def _mark_unreachable(self, problem: str) -> None:
        self.reachable = False
        self._last_attempt = time.monotonic()
        log.warning(
            "tracking server unreachable; continuing without tracking (run %s marked in logs): %s: %s; "
            "checking again every %g s",
            self._run_id,
            _redact(self.tracking_uri),
            problem,
            self.reconnect_every_s,
        )

    def _try_reconnect(self, force: bool = False) -> bool:
        """While unreachable: at most every `reconnect_every_s` (or now, if `force`), check whether it is back."""
        now = time.monotonic()
        if not force and now - self._last_attempt < self.reconnect_every_s:
            return False
        self._last_attempt = now
        if _health_problem(self.tracking_uri, min(self.timeout_s, 3.0)):
            return False
        self.reachable = True
        log.warning(
            "tracking server %s reachable again; resuming run %s (%d logging calls dropped meanwhile)",
            _redact(self.tracking_uri),
            self._run_id,
            self.dropped_calls,
        )
        if self._system_metrics and not self._finished and not self._monitor_alive():
            self._start_system_metrics(resume=True)
        return True

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key in self._warned:
            log.debug(message, *args)
        else:
            self._warned.add(key)
            log.warning(message + " (further such warnings are not shown)", *args)

    def _monitor_alive(self) -> bool:
        thread = getattr(self._monitor, "_process", None)
        return thread is not None and thread.is_alive()

    def _start_system_metrics(self, resume: bool) -> None:
        global _psutil_warned
        if importlib.util.find_spec("psutil") is None:
            if not _psutil_warned:
                _psutil_warned = True
                log.warning("psutil is not installed; system metrics are not logged (pip install psutil)")
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            with self._quick_http():
                monitor = SystemMetricsMonitor(self._run_id, resume_logging=resume, tracking_uri=self.tracking_uri)
            monitor.start()
            self._monitor = monitor
        except Exception as err:
            log.warning("system metrics are not logged: %s", err)

    def _stop_system_metrics(self, wait: bool) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        # SystemMetricsMonitor.finish() joins the sampling thread and flushes; bound the wait in case the server hangs.
        stopper = threading.Thread(target=monitor.finish, name="ddcolor-stop-system-metrics", daemon=True)
        stopper.start()
        stopper.join(timeout=self.timeout_s if wait else 0.5)

    def _at_exit(self) -> None:
        if not self._finished:
            log.warning("MLflow run %s was not finished; marking it KILLED", self._run_id)
            self.finish("KILLED")


def start_tracker(
    config: Config,
    *,
    enabled: bool = True,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_system_metrics: bool = True,
    run_id: str | None = None,
) -> Tracker:
    """The trainer's tracker: a `NullTracker` when not `enabled`, else an `MlflowTracker` run in
    ``config.registry.experiment_name`` with every parameter (``config.to_flat_dict()``) logged.

    With `run_id`, the tracker attaches to that existing run (its parameters are already logged; nothing is
    re-logged), so e.g. evaluation metrics land on the training run the registry gates.

    Raises:
        TrackingError: tracking is enabled but the server/store cannot be used.
    """
    if not enabled:
        return NullTracker()
    tracker = MlflowTracker(
        tracking_uri,
        experiment=config.registry.experiment_name,
        run_name=run_name,
        log_system_metrics=log_system_metrics and run_id is None,
        tags=tags,
        run_id=run_id,
    )
    if run_id is None:
        tracker.log_params(config.to_flat_dict())
    return tracker
