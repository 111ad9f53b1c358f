"""Everything MLflow, in one package (mlflow itself is imported lazily, so importing this package is cheap).

* `ddcolor.tracking.client`: leaf helpers, the tracking URI and its client, health check, redaction, run URLs;
* `ddcolor.tracking.context`: run context (git commit, package versions, host);
* `ddcolor.tracking.tracker`: the `Tracker` protocol, `NullTracker`, `MlflowTracker`, `start_tracker`;
* `ddcolor.tracking.pyfunc`: the serving model `DDColorPyfunc` and its `model_signature` (the only module here
  that imports `ddcolor.colorize`).

The model registry (aliases, gates, promotion) is `ddcolor.registry`, built on `ddcolor.tracking.client`.
"""

from __future__ import annotations

from typing import Any

from ddcolor.tracking.context import run_context_tags
from ddcolor.tracking.tracker import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    RUN_STATUSES,
    MlflowTracker,
    NullTracker,
    Tracker,
    TrackingError,
    default_run_name,
    start_tracker,
)

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "RUN_STATUSES",
    "DDColorPyfunc",  # defined on first access (see __getattr__), as it subclasses an mlflow class
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "TrackingError",
    "default_run_name",
    "model_signature",  # see __getattr__
    "run_context_tags",
    "start_tracker",
]


def __getattr__(name: str) -> Any:
    # Lazy: the pyfunc module is imported only when asked for (models logged before the package split pickled the
    # class by reference as ``ddcolor.tracking.DDColorPyfunc``, so this name must keep resolving).
    if name in ("DDColorPyfunc", "model_signature"):
        from ddcolor.tracking import pyfunc

        return getattr(pyfunc, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
