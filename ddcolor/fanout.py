"""Fan-out of per-batch work: a local process pool, or a Prefect task runner (threads, processes, Dask, Ray).

The unit is a *mapper*, ``map_batches(fn, jobs) -> iterator of fn(job)``, results in job order, consumed as they
come (bounded memory); `ddcolor.data.ingest.ingest` and `ddcolor.archive.colorize_archive` take one. Three exist:

    map_in_process            every job in this process (tests, ``num_workers=0``)
    ProcessPoolMapper(n)      n local worker processes (forkserver) -- the default of ingest and colorize-archive
    TaskRunnerMapper(runner)  one Prefect task run per job on a task runner (inside a flow run)

A mapper used as a context manager (``with mapper:``) keeps its pool / runner (a temporary Dask cluster, a local
Ray) up across calls: ingestion maps twice per window of inputs (hash, then write shards).

Everything a cluster worker has to unpickle lives in the installed package (never in ``flows/``, which a cluster
does not have): the task runner is built from a spec string (`build_task_runner`).

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
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, TypeVar

from ddcolor.errors import DDColorError

__all__ = [
    "IN_FLIGHT",
    "TASK_RUNNERS",
    "ProcessPoolMapper",
    "TaskRunnerMapper",
    "WorkerDiedError",
    "build_task_runner",
    "map_in_process",
    "mapper_session",
    "parse_task_runner",
    "pickle_flow_module_by_value",
    "use_one_torch_thread",
    "windows",
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
    consumed (bounded memory); closing the generator early (a failure downstream) stops consuming. A task raises
    what ``fn`` raised (``retries`` re-runs it first; on Dask a task lost with its worker is re-run by Dask).

    Args:
        runner: a Prefect task runner (`build_task_runner`); it is duplicated and started per call, or once for
            all calls made inside ``with mapper:``. task_name: the task run name in the Prefect UI (default: the
            function's name, ``hash_batch`` -> ``hash-batch``). retries: per task.
        on_result: called as ``on_result(done, total)`` after each job's result is consumed (progress).
    """

    def __init__(
        self,
        runner: Any,
        task_name: str | None = None,
        *,
        retries: int = 0,
        on_result: Callable[[int, int], None] | None = None,
    ) -> None:
        self.runner, self.task_name, self.retries, self.on_result = runner, task_name, retries, on_result
        self._session: contextlib.ExitStack | None = None
        self._started: Any = None

    def __repr__(self) -> str:
        return f"Prefect {type(self.runner).__name__}"

    def __enter__(self) -> TaskRunnerMapper:
        self._session = contextlib.ExitStack()
        self._started = self._session.enter_context(self.runner.duplicate())
        return self

    def __exit__(self, *exc: object) -> None:
        session, self._session, self._started = self._session, None, None
        if session is not None:
            session.close()

    def __call__(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        _ship_current_flow_by_value()
        name = self.task_name or fn.__name__.replace("_", "-")
        # no cache key (it would hash every job) and no stored results (encoded images stay off the result store)
        wrapped = task(fn, name=name, cache_policy=NO_CACHE, persist_result=False, retries=self.retries)
        with contextlib.ExitStack() as stack:
            runner = self._started or stack.enter_context(self.runner.duplicate())
            yield from self._map(runner, wrapped, jobs)

    def _map(self, runner: Any, wrapped: Any, jobs: Sequence[J]) -> Iterator[Any]:
        todo = iter(jobs)
        done = 0
        pending = deque(runner.submit(wrapped, {"job": job}) for job in islice(todo, IN_FLIGHT))
        while pending:
            result = pending.popleft().result()  # raises what the task raised
            job = next(todo, None)
            if job is not None:
                pending.append(runner.submit(wrapped, {"job": job}))
            done += 1
            if self.on_result is not None:
                self.on_result(done, len(jobs))
            yield result


class WorkerDiedError(DDColorError):
    """A local worker process died (killed, or out of memory). What was committed before is kept."""


def use_one_torch_thread() -> None:
    """A worker process computes on one core: an executor already runs one process per core."""
    with contextlib.suppress(Exception):  # torch is optional for some jobs; never fail a worker over it
        import torch

        torch.set_num_threads(1)


class ProcessPoolMapper:
    """``map_batches(fn, jobs)`` on ``workers`` local processes, results in job order (``workers`` <= 0: in this
    process). ``fn`` and the jobs must pickle (a function of the installed package, dataclass jobs).

    Processes start with ``forkserver`` (no fork of a process that holds threads: torch, boto3) and use one torch
    thread each. At most ``4 x workers`` jobs are submitted ahead of the one being consumed. ``with mapper:``
    keeps the pool up across calls; otherwise each call starts and stops its own.

    Raises (from the iterator):
        WorkerDiedError: a worker process died; the message says what to try.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"a pool of {self.workers} processes" if self.workers > 0 else "this process"

    def _start(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        # the workers get this process's environment as of now (a forkserver started earlier would hand out its own)
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(dict(os.environ),))

    def __enter__(self) -> ProcessPoolMapper:
        if self.workers > 0:
            self._executor = self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __call__(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        if self.workers <= 0 or (len(jobs) <= 1 and self._executor is None):  # no pool started for one job
            yield from map_in_process(fn, jobs)
            return
        own = self._executor is None
        executor = self._start() if own else self._executor
        pending: deque[Future[R]] = deque()
        todo = iter(jobs)
        try:
            pending.extend(executor.submit(fn, job) for job in islice(todo, 4 * self.workers))
            while pending:
                result = pending.popleft().result()
                job = next(todo, None)
                if job is not None:
                    pending.append(executor.submit(fn, job))
                yield result
        except BrokenProcessPool as err:
            raise WorkerDiedError(
                f"a worker process died ({err}); out of memory? Lower the number of workers (data.num_workers / "
                "--workers) and rerun the same command: what was finished is kept, the rerun completes the rest"
            ) from err
        finally:
            for future in pending:
                future.cancel()
            if own:
                executor.shutdown(wait=True, cancel_futures=True)


def _init_worker(environ: dict[str, str]) -> None:
    # storage settings (AWS_*, DDCOLOR_*) as the parent has them now
    os.environ.clear()
    os.environ.update(environ)
    use_one_torch_thread()


def mapper_session(mapper: Any) -> contextlib.AbstractContextManager[Any]:
    """``with mapper:`` when the mapper supports it (keeps its pool up across calls), else nothing."""
    if hasattr(mapper, "__enter__") and hasattr(mapper, "__exit__"):
        return mapper
    return contextlib.nullcontext(mapper)


def map_in_process(fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]:
    """The trivial ``map_batches``: every job in this process, in order (tests, ``--task-runner none``)."""
    for job in jobs:
        yield fn(job)


def windows(items: Iterable[J], size: int) -> Iterator[tuple[list[J], bool]]:
    """``(window, last)``: consecutive lists of up to ``size`` items of a stream (a listing), each with whether it
    is the last one. One window is read ahead to know that, so at most two are held at once."""
    stream = iter(items)
    window = list(islice(stream, size))
    while window:
        following = list(islice(stream, size))
        yield window, not following
        window = following
