"""Fan-out of per-batch work over a Prefect task runner: a local process pool, Dask or Ray.

Everything a cluster worker has to unpickle lives here, in the installed package (never in ``flows/``, which a
cluster does not have): the task runner is built from a spec string, and `TaskRunnerMapper` turns it into the
``map_batches(fn, jobs)`` executor that `ddcolor.data.ingest.ingest` and `ddcolor.archive.colorize_archive` take.

Specs (`TASK_RUNNERS`)::

    thread | process                 Prefect's built-in runners (threads of / processes beside the flow process)
    dask                             a temporary `distributed.LocalCluster` for the run (one worker per core)
    dask://host:port                 an existing Dask scheduler (``dask scheduler`` + ``dask worker ...``)
    ray                              a local Ray instance started for the run (``ray.init()``)
    ray://host:port                  an existing Ray cluster through Ray Client (port 10001 on the head)

A cluster must have this ``ddcolor`` version installed (the same Python, torch and Prefect minor) and read storage
settings (``AWS_*``, ``DDCOLOR_*``) from its own environment: no credential travels inside a task payload.

Prefect serialises the flow run context, *including the flow object*, with every task it sends to Dask or Ray. A
flow defined outside the installed package (``flows/*.py``, run from a checkout) would be pickled by reference and
fail on the cluster with ``ModuleNotFoundError: No module named 'flows'``; `pickle_flow_module_by_value` makes the
flow module travel by value instead (its imports of ``ddcolor`` still resolve on the worker).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, TypeVar

__all__ = [
    "IN_FLIGHT",
    "TASK_RUNNERS",
    "TaskRunnerMapper",
    "build_task_runner",
    "map_in_process",
    "parse_task_runner",
    "pickle_flow_module_by_value",
]

J = TypeVar("J")
R = TypeVar("R")

TASK_RUNNERS = ("thread", "process", "dask", "dask://host:port", "ray", "ray://host:port")
_CLUSTER_RUNNERS = {  # kind: (package to install, module, class)
    "dask": ("prefect-dask", "prefect_dask", "DaskTaskRunner"),
    "ray": ("prefect-ray", "prefect_ray", "RayTaskRunner"),
}
IN_FLIGHT = 64  # tasks submitted ahead of the one whose result is being consumed (bounded memory on the driver)


def parse_task_runner(spec: str, what: str = "task_runner") -> tuple[str, str]:
    """``"dask://h:p"`` -> ``("dask", "h:p")``; ``"process"`` -> ``("process", "")``. ``what``: the option's name.

    Raises:
        ValueError: not one of `TASK_RUNNERS` (the message lists them).
    """
    kind, sep, address = spec.strip().partition("://")
    if (kind in ("thread", "process") and not sep) or (kind in _CLUSTER_RUNNERS and (not sep or address)):
        return kind, address
    raise ValueError(f"{what}={spec!r} is not a task runner; use one of {', '.join(TASK_RUNNERS)}")


def build_task_runner(spec: str, *, max_workers: int | None = None, what: str = "task_runner") -> Any:
    """The Prefect task runner named by ``spec`` (see `TASK_RUNNERS`).

    Args:
        spec: the runner. max_workers: processes of a ``process`` runner / workers of a temporary ``dask``
            cluster / CPUs of a local ``ray`` (None: one per core). what: the option's name, for messages.

    Raises:
        ValueError: an unknown name, or a ``dask://`` / ``ray://`` without an address.
        ImportError: ``dask*`` / ``ray*`` without prefect-dask / prefect-ray installed (the message says what to
            install).
    """
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    kind, address = parse_task_runner(spec, what)
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=max_workers)
    if kind == "process":
        return ProcessPoolTaskRunner(max_workers=max_workers)
    package, module, name = _CLUSTER_RUNNERS[kind]
    try:
        runner_class = getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise ImportError(
            f"{what}={spec!r} needs {package}, which is not installed: pip install {package} "
            "(pinned in constraints.txt; or use the task runner 'process')"
        ) from err
    if address:  # Dask schedulers listen on tcp://host:8786; Ray clients connect to ray://host:10001
        return runner_class(address=f"tcp://{address}" if kind == "dask" else f"ray://{address}")
    if max_workers is None:
        return runner_class()  # a temporary local cluster for the run
    if kind == "dask":
        return runner_class(cluster_kwargs={"n_workers": max_workers, "threads_per_worker": 1, "processes": True})
    return runner_class(init_kwargs={"num_cpus": max_workers})


def pickle_flow_module_by_value(module_name: str) -> None:
    """Make cloudpickle ship the module ``module_name`` (a flow file outside the package) by value.

    Call it at import time in a flow file under ``flows/``: Prefect pickles the flow with every task it sends to
    Dask or Ray, and a worker cannot import ``flows``. Harmless when the module is importable on the worker.
    """
    if module_name.split(".")[0] not in ("ddcolor", "__main__", "prefect"):
        _BY_VALUE.add(module_name)
    _register_by_value()


_BY_VALUE: set[str] = set()  # modules to pickle by value, re-registered once Ray (its own cloudpickle) is imported


def _register_by_value() -> None:
    import cloudpickle

    picklers = [cloudpickle]
    if "ray" in sys.modules:  # Ray pickles with its own copy of cloudpickle
        from ray import cloudpickle as ray_cloudpickle

        picklers.append(ray_cloudpickle)
    for name in _BY_VALUE:
        for pickler in picklers:
            with contextlib.suppress(ValueError):  # already registered
                pickler.register_pickle_by_value(sys.modules[name])


def _ship_current_flow_by_value() -> None:
    """`pickle_flow_module_by_value` for the flow of the current flow run (any flow file, the caller's or a test's)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    module = getattr(getattr(getattr(ctx, "flow", None), "fn", None), "__module__", None)
    if module and module in sys.modules:
        pickle_flow_module_by_value(module)


class TaskRunnerMapper:
    """``map_batches(fn, jobs)`` on a Prefect task runner: one task run of ``fn`` per job, results in job order.

    Must be called inside a Prefect flow run. At most `IN_FLIGHT` jobs are submitted ahead of the one being
    consumed (bounded memory); closing the generator early (a failure downstream) shuts the runner down. A task
    raises what ``fn`` raised (``retries`` re-runs it first: a worker lost to SIGKILL is a retry on Dask/Ray).

    Args:
        runner: a Prefect task runner (`build_task_runner`); it is duplicated per call, so one mapper serves
            several calls. task_name: the task run name in the Prefect UI. retries: per task.
        on_result: called as ``on_result(done, total)`` after each job's result is consumed (progress).
    """

    def __init__(
        self,
        runner: Any,
        task_name: str = "prepare-batch",
        *,
        retries: int = 0,
        on_result: Callable[[int, int], None] | None = None,
    ) -> None:
        self.runner, self.task_name, self.retries, self.on_result = runner, task_name, retries, on_result

    def __repr__(self) -> str:
        return f"Prefect {type(self.runner).__name__}"

    def __call__(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        _ship_current_flow_by_value()
        # no cache key (it would hash every job) and no stored results (encoded images stay off the result store)
        prepare = task(fn, name=self.task_name, cache_policy=NO_CACHE, persist_result=False, retries=self.retries)
        todo = iter(jobs)
        done = 0
        with self.runner.duplicate() as runner:
            pending = deque(runner.submit(prepare, {"job": job}) for job in islice(todo, IN_FLIGHT))
            while pending:
                result = pending.popleft().result()  # raises what the task raised
                job = next(todo, None)
                if job is not None:
                    pending.append(runner.submit(prepare, {"job": job}))
                done += 1
                if self.on_result is not None:
                    self.on_result(done, len(jobs))
                yield result


def map_in_process(fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
    """The trivial ``map_batches``: every job in this process, in order (tests, ``--task-runner none``)."""
    for job in jobs:
        yield fn(job)
