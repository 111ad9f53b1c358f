"""The experiment tracker: what the trainer and the evaluation log to (mlflow is imported lazily).

The trainer talks to a :class:`Tracker`; :class:`MlflowTracker` sends everything to an MLflow tracking server or
store, :class:`NullTracker` drops it (tracking off, tests). Usage::

    with start_tracker(cfg) as tracker:                   # MLflow run + every param of params.yaml
        tracker.set_tags(dataset_version(cfg.data.shards_uri).as_tags())
        for step in ...:
            tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/images_per_s": ips}, step=step)
        tracker.log_image(grid_uint8_hwc, key="val_samples", step=step)
        uri = tracker.log_model(save_checkpoint(generator, "checkpoints/generator"))   # "models:/m-..."
    # leaving the block finishes the run: FINISHED, FAILED on an exception, KILLED on Ctrl-C

Naming. Experiments the platform creates or uses get the tag ``mlflow.experimentKind=custom_model_development``
(a value a person already set is kept). A run started without an explicit name is named after what it is
(`default_run_name`): the Prefect flow-run name when the tags carry one, else
``<preset>-<input_size>px-<steps>steps-<first 8 hex of the dataset manifest sha256>``.

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

The final generator is logged as an MLflow ``LoggedModel`` (pyfunc flavor, `ddcolor.tracking.pyfunc.DDColorPyfunc`):
artifacts ``checkpoint`` (safetensors) and ``config`` (JSON), a tensor signature uint8 (B,H,W,3) RGB images -> uint8
(B,H,W,3) colorized images (param ``input_size``, default 512); load it with ``mlflow.pyfunc.load_model(uri)`` or
serve it with ``mlflow models serve -m <uri>``. The same two files are also run artifacts
under ``checkpoint/``, and the run gets the tag ``ddcolor.model_uri``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ddcolor.errors import DDColorError
from ddcolor.tracking import client as tracking_client
from ddcolor.tracking.client import health_problem, is_http, redact, use_tracking_uri
from ddcolor.tracking.context import run_context_tags

if TYPE_CHECKING:
    import numpy as np

    from ddcolor.config import Config

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "FLOW_RUN_NAME_TAG",
    "RUN_STATUSES",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "default_run_name",
    "start_tracker",
]

log = logging.getLogger(__name__)

#: Experiment tag the MLflow UI reads to show an experiment as custom model development (set on experiments we create
#: or use, unless a person already set another value).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Run statuses accepted by :meth:`Tracker.finish`.
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"
# MLflow's limits (mlflow.utils.validation); used only when that module cannot be imported.
_MAX_PARAM_VAL_LENGTH = 6000
_MAX_TAG_VAL_LENGTH = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

_psutil_warned = False
#: Run tags: the run's logged model (``models:/m-...``) and the training step it was logged at.
MODEL_URI_TAG = "ddcolor.model_uri"
MODEL_STEP_TAG = "ddcolor.model_step"


class TrackingError(DDColorError, RuntimeError):
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

    def log_dataset(self, uri: str, manifest_sha256: str, context: str, *, rows: int | None = None) -> None:
        """Record a shard dataset as a run input (MLflow "Datasets used"), `context` "training" or "eval"."""
        ...

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED); later calls do nothing."""
        ...

    def __enter__(self) -> Tracker:
        """The tracker itself (``with start_tracker(...) as tracker:``)."""
        ...

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Finish the run: FINISHED without an exception, KILLED on KeyboardInterrupt, else FAILED."""
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

    def log_dataset(self, uri: str, manifest_sha256: str, context: str, *, rows: int | None = None) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        pass


# --- helpers -----------------------------------------------------------------------------------------------


def _run_tags(tags: Mapping[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


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


# --- MLflow tracker ----------------------------------------------------------------------------------------


class MlflowTracker:
    """A `Tracker` that logs one MLflow run (see the module docstring for the failure policy).

    Args:
        tracking_uri: MLflow server (``http(s)://...``) or store (``sqlite:///...``); None reads
            ``MLFLOW_TRACKING_URI`` via `ddcolor.config.EnvSettings` (default ``sqlite:///mlflow.db`` in the working
            directory).
        experiment: experiment name (created when missing; tagged ``mlflow.experimentKind``, see the module
            docstring).
        run_name: MLflow run name (None: MLflow picks one; `start_tracker` passes `default_run_name`).
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
        tracking_uri = tracking_client.tracking_uri(tracking_uri)
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
        # the run's logged model: `val/*` metrics are its evaluation, linked to it (model_id) at its step
        self._model_id: str | None = None
        self._model_step = 0
        self._warned: set[str] = set()
        self._lock = threading.RLock()
        self._monitor: Any = None
        self._system_metrics = log_system_metrics
        self._http = is_http(tracking_uri)
        shown = redact(tracking_uri)

        if self._http:
            problem = health_problem(tracking_uri, self.timeout_s)
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
                    model_uri = run.data.tags.get(MODEL_URI_TAG, "")
                    if model_uri.startswith("models:/m-"):  # evaluating the model this run trained
                        self._model_id = model_uri.removeprefix("models:/")
                        self._model_step = int(run.data.tags.get(MODEL_STEP_TAG, "0") or 0)
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
            at, model_id = int(step), None
            if self._model_id and str(key).startswith("val/"):
                at, model_id = self._model_step, self._model_id  # the model page shows its evaluation
            try:
                items.append(Metric(str(key), float(value), timestamp, at, model_id=model_id))
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
        from ddcolor.tracking import pyfunc

        checkpoint = _resolve_checkpoint(Path(model_dir_or_checkpoint), name)
        with tempfile.TemporaryDirectory(prefix="ddcolor-model-") as tmp:
            config = pyfunc.checkpoint_config_file(checkpoint, Path(tmp))

            def send() -> str:
                # the checkpoint is stored once, inside the LoggedModel (artifacts/), not also as a run artifact
                logged = self._client.create_logged_model(
                    experiment_id=self.experiment_id,
                    name=name,
                    source_run_id=self._run_id,
                    model_type="ddcolor-generator",
                    tags={"ddcolor.checkpoint": checkpoint.name},
                )
                with use_tracking_uri(self.tracking_uri):
                    info = self._log_pyfunc(logged.model_id, checkpoint, config, name)
                self._client.set_tag(self._run_id, MODEL_URI_TAG, info.model_uri)
                self._client.set_tag(self._run_id, MODEL_STEP_TAG, str(self._last_step))
                self._model_id, self._model_step = logged.model_id, self._last_step
                return info.model_uri

            uri = self._guarded("log_model", send, timeout_s=self.artifact_timeout_s)
        if uri:
            log.info("logged model %s (run %s)", uri, self._run_id)
        return uri

    def _log_pyfunc(self, model_id: str, checkpoint: Path, config: Path, name: str) -> Any:
        """``mlflow.pyfunc.log_model`` for our run without making it the active run (``Model.log`` takes run_id)."""
        import mlflow.pyfunc
        from mlflow.models import Model

        from ddcolor.tracking import pyfunc

        return Model.log(
            artifact_path=None,
            name=name,
            flavor=mlflow.pyfunc,
            run_id=self._run_id,
            model_id=model_id,
            step=self._last_step,
            python_model=pyfunc.DDColorPyfunc(),
            artifacts={"checkpoint": str(checkpoint), "config": str(config)},
            signature=pyfunc.model_signature(),
            input_example=pyfunc.input_example(),
            # no index has ddcolor: its source travels with the model, its dependencies are pinned
            code_paths=[pyfunc.package_code_path()],
            pip_requirements=pyfunc.serving_requirements(),
        )

    def log_dataset(self, uri: str, manifest_sha256: str, context: str, *, rows: int | None = None) -> None:
        """Record the shard dataset at `uri` as an input of the run, shown under "Datasets used".

        Args:
            uri: the dataset (local folder or ``s3://`` prefix): the MLflow dataset's source.
            manifest_sha256: sha256 of its ``manifest.json``; the MLflow digest is its first 36 hex characters
                (MLflow's limit), the whole of it is in the dataset profile.
            context: ``training`` or ``eval`` (input tag ``mlflow.data.context``); the dataset is named after the
                last part of `uri`, with `` (eval)`` appended outside training (MLflow would merge the two inputs).
            rows: images in the dataset, when known (profile).
        """
        if self._run_id is None or self._finished:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        name = uri.rstrip("/").rsplit("/", 1)[-1] or uri
        if context != "training":  # MLflow keeps one input per dataset (name, digest) and run: the eval one is named
            name = f"{name} ({context})"
        dataset = Dataset(
            name=name,
            digest=manifest_sha256[:36],
            source_type="s3" if uri.startswith("s3://") else "local",
            source=json.dumps({"uri": uri}),
            profile=json.dumps({"manifest_sha256": manifest_sha256, "rows": rows}),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])]
        self._guarded("log_dataset", lambda: self._client.log_inputs(self._run_id, datasets=inputs))

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
                    redact(self.tracking_uri),
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
        """The id of experiment `name`, created when missing, tagged `EXPERIMENT_KIND` unless already tagged."""
        from mlflow.exceptions import MlflowException

        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self._client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created concurrently by another process
                experiment = self._client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} on {redact(self.tracking_uri)} is deleted; restore it "
                f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) or use another name"
            )
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):  # an experiment made before, or by another tool
            self._client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
                problem = health_problem(self.tracking_uri, min(self.timeout_s, 3.0)) if self._http else None
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
            redact(self.tracking_uri),
            problem,
            self.reconnect_every_s,
        )

    def _try_reconnect(self, force: bool = False) -> bool:
        """While unreachable: at most every `reconnect_every_s` (or now, if `force`), check whether it is back."""
        now = time.monotonic()
        if not force and now - self._last_attempt < self.reconnect_every_s:
            return False
        self._last_attempt = now
        if health_problem(self.tracking_uri, min(self.timeout_s, 3.0)):
            return False
        self.reachable = True
        log.warning(
            "tracking server %s reachable again; resuming run %s (%d logging calls dropped meanwhile)",
            redact(self.tracking_uri),
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


#: Tag holding the Prefect flow-run name (set by the ``train-ddcolor`` flow); a run carrying it is named after it.
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"


def default_run_name(config: Config, *, dataset_uri: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """What a run is, as its name: the Prefect flow-run name when `tags` carry one (``prefect.flow_run_name``),
    else ``<preset>-<input_size>px-<steps>steps-<sha8>``, e.g. ``atto-256px-100steps-3f2a9c1e``.

    Args:
        config: gives ``model.preset``, the network input side during training ``data.size`` (px) and
            ``train.max_steps``.
        dataset_uri: the shard dataset (default ``data.shards_uri``); ``<sha8>`` is the first 8 hex digits of the
            sha256 of its manifest. Left out (with its dash) when the manifest cannot be read.
        tags: the run's tags.
    """
    flow_run = (tags or {}).get(FLOW_RUN_NAME_TAG)
    if flow_run:
        return str(flow_run)
    name = f"{config.model.preset}-{config.data.size}px-{config.train.max_steps}steps"
    try:
        from ddcolor.data.manifest import manifest_sha256  # not dataset_version: a name needs no DVC status

        sha = manifest_sha256(dataset_uri or config.data.shards_uri)
    except Exception as err:  # a name is not worth failing a run over; the log says why it is shorter
        log.debug("run name without dataset hash (%s)", err)
        return name
    return f"{name}-{sha[:8]}"


def start_tracker(
    config: Config,
    *,
    enabled: bool = True,
    run_name: str | None = None,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    log_system_metrics: bool = True,
    run_id: str | None = None,
    dataset_uri: str | None = None,
) -> Tracker:
    """The trainer's tracker: a `NullTracker` when not `enabled`, else an `MlflowTracker` run in
    ``config.registry.experiment_name`` with every parameter (``config.to_flat_dict()``) logged.

    With `run_id`, the tracker attaches to that existing run (its parameters are already logged; nothing is
    re-logged), so e.g. evaluation metrics land on the training run the registry gates. Without `run_name` a new
    run is named by `default_run_name` (from `config`, `dataset_uri` and `tags`).

    Raises:
        TrackingError: tracking is enabled but the server/store cannot be used.
    """
    if not enabled:
        return NullTracker()
    if run_name is None and run_id is None:
        run_name = default_run_name(config, dataset_uri=dataset_uri, tags=tags)
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
