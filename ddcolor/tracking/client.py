"""Leaf MLflow helpers: which tracking URI, a client for it, is it up, how to show it, where a run is.

Every other module that talks to MLflow (the tracker, the registry, the pipeline, the playground) gets its client and
URI here, so the fallback to ``MLFLOW_TRACKING_URI`` (via `ddcolor.config.EnvSettings`, default
``sqlite:///mlflow.db``) lives in one place. This module imports no other ddcolor module at import time (only
`ddcolor.config`, lazily, for that fallback) and mlflow only inside functions, so importing it is cheap.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "client",
    "error_code",
    "health_problem",
    "is_http",
    "is_not_found",
    "redact",
    "run_url",
    "tracking_uri",
    "use_tracking_uri",
]

#: MLflow error codes meaning "no such thing" (an alias that does not exist is INVALID_PARAMETER_VALUE on some stores).
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def tracking_uri(uri: str | None = None) -> str:
    """`uri` itself, or ``MLFLOW_TRACKING_URI`` from the environment when None (default ``sqlite:///mlflow.db``)."""
    return _resolve(uri)


def _resolve(uri: str | None) -> str:  # for functions whose ``tracking_uri`` argument hides `tracking_uri`
    if uri is not None:
        return uri
    from ddcolor.config import EnvSettings

    return EnvSettings.from_env().mlflow_tracking_uri


def client(uri: str | None = None) -> MlflowClient:
    """An ``MlflowClient`` for tracking *and* registry at `uri` (None: see `tracking_uri`); no global URI is set."""
    import mlflow

    uri = tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_http(uri: str) -> bool:
    """True for an MLflow tracking *server* (``http(s)://``), False for a local store (``sqlite:``, ``file:``, path)."""
    return uri.startswith(("http://", "https://"))


def redact(uri: str) -> str:
    """The URI with any password replaced by ``***`` (safe to log or show)."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def error_code(err: BaseException) -> str:
    """The MLflow error code of `err` (e.g. ``RESOURCE_DOES_NOT_EXIST``), or "" for other exceptions."""
    return str(getattr(err, "error_code", ""))


def is_not_found(err: BaseException) -> bool:
    """True when `err` is MLflow saying the model, version, alias or run does not exist."""
    code = error_code(err)
    return any(name in code for name in _NOT_FOUND_CODES)


def health_problem(uri: str, timeout: float) -> str | None:
    """None when ``GET {uri}/health`` answers like an MLflow server does, else what went wrong (one sentence).

    Args:
        uri: an ``http(s)://`` tracking server (credentials in the URL are sent as basic auth).
        timeout: seconds to wait for the answer.
    """
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


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` only inside the block.

    For the few MLflow calls that read the global URI instead of their client's (``Model.log``; a SQL store's
    ``create_model_version``). The environment variable ``MLFLOW_TRACKING_URI`` is the same afterwards as before:
    MLflow's own helper restores its global URI, and restoring it to "never set" (None) *unsets* the variable
    (``set_tracking_uri(None)``), which would send every later call in this process (e.g. evaluation after training
    in one flow run) to the default ``sqlite:///mlflow.db``.
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


def run_url(run_id: str, *, experiment_id: str | None = None, tracking_uri: str | None = None) -> str | None:
    """The MLflow UI page of a run (``<server>/`` + `ui_fragment`, password redacted) for an HTTP
    tracking server, else None (a local store has no UI running).

    Args:
        experiment_id: the run's experiment; None looks it up (one request).
        tracking_uri: None: see `tracking_uri`.
    """
    uri = _resolve(tracking_uri)
    if not is_http(uri):
        return None
    if experiment_id is None:
        experiment_id = client(uri).get_run(run_id).info.experiment_id
    return f"{redact(uri).rstrip('/')}/{ui_fragment(experiment_id, run_id)}"


# MLflow 3.17's web UI opens every experiment in its GenAI workflow (traces/tokens overview) unless the page address
# asks for the classic one: with its workflow switch on, the UI ignores the experiment's ``mlflow.experimentKind`` tag
# (the tracker still sets it, for UIs that read it). The choice then sticks in the browser's local storage.
UI_WORKFLOW_QUERY = "?workflowType=machine_learning"


def ui_fragment(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI address (after the server root) of an experiment's runs table, or of one run, in the classic
    machine-learning workflow: ``#/experiments/<exp>/runs[/<run>]?workflowType=machine_learning``."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return page + UI_WORKFLOW_QUERY
