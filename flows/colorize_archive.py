"""Prefect 3 flow ``colorize-archive``: colorize a whole collection with a (registered) model on a task runner.

Thin Prefect wiring over `ddcolor.archive.colorize_archive`: one ``colorize-batch`` task run per batch of files on
the task runner (``process``, ``dask``, ``dask://host:port``, ``ray``, ``ray://host:port``: `ddcolor.fanout`), a
progress artifact updated as batches finish, and a Markdown summary artifact (counts, throughput, failures). Run it::

    ddcolor colorize-archive s3://bucket/scans/ --out s3://bucket/colorized/ --model models:/ddcolor@champion \\
        --task-runner dask://dask-scheduler:8786
    prefect deployment run colorize-archive/colorize-archive -p source=s3://... -p out=s3://...

Resumable: a rerun (or a retry of a batch whose worker died) skips what is already written for the same input and
model version. Endpoints and credentials (``AWS_*``, ``MLFLOW_TRACKING_URI``) come from each process's environment.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.states import Completed, State

from ddcolor import archive, fanout

fanout.pickle_flow_module_by_value(__name__)  # Dask/Ray workers get this flow with each task; they lack `flows`

__all__ = ["ARTIFACT_KEYS", "colorize_archive_flow"]

ARTIFACT_KEYS = {"summary": "colorize-archive-summary", "progress": "colorize-archive-progress"}
BATCH_RETRIES = 2  # a batch whose worker died (SIGKILL, OOM, preempted node) runs again; done files are skipped


@flow(name="colorize-archive")
def colorize_archive_flow(
    source: str,
    out: str,
    model: str = "models:/ddcolor@champion",
    task_runner: str = "process",
    workers: int | None = None,
    batch_size: int = archive.BATCH,
    input_size: int = 512,
    precision: str = "auto",
    ab_upsample: str = "bilinear",
    device: str = "auto",
    max_pixels: int | None = archive.DEFAULT_MAX_PIXELS,
    torch_threads: int | None = None,
) -> State:
    """Colorize every image under ``source`` into ``out`` (see `ddcolor.archive`).

    Args:
        source, out: local folders or ``s3://`` prefixes. model: release name, checkpoint file or models:/ URI.
        task_runner: where the batches run (`ddcolor.fanout.TASK_RUNNERS`). workers: processes of ``process`` /
            a temporary ``dask`` cluster / CPUs of a local ``ray`` (None: one per core).
        batch_size: files per task. input_size, precision, ab_upsample, device, max_pixels: as ``ddcolor colorize``.
        torch_threads: torch threads per worker process (None: torch's default; give cores / processes when several
            worker processes share a machine).

    Returns:
        Completed, message the counts, result the report as a dict. Bad inputs (corrupt, unsupported) do not fail
        the run: they are counted as failed in the message, the summary artifact and the manifest, and a rerun
        retries only them. Failed is for a broken run (storage unreachable, a batch failing after its retries).
    """
    logger = get_run_logger()
    runner = fanout.build_task_runner(task_runner, max_workers=workers, what="task_runner")
    progress_id = create_progress_artifact(0.0, key=ARTIFACT_KEYS["progress"], description=f"{source} -> {out}")

    def on_result(done: int, total: int) -> None:
        if progress_id is not None:
            update_progress_artifact(progress_id, 100.0 * done / max(total, 1))

    mapper = fanout.TaskRunnerMapper(runner, "colorize-batch", retries=BATCH_RETRIES)
    settings = archive.ColorizeSettings(input_size, ab_upsample, device, precision, max_pixels, torch_threads)
    report = archive.colorize_archive(
        source, out, model, settings=settings, map_batches=mapper, batch_size=batch_size, on_progress=on_result
    )
    report.workers = workers or 0
    create_markdown_artifact(
        report.to_markdown(), key=ARTIFACT_KEYS["summary"], description=f"colorize-archive {source} -> {out}"
    )
    logger.info(report.summary())
    result: dict[str, Any] = {
        "inputs": report.inputs,
        "done": report.done,
        "skipped": report.skipped,
        "failed": len(report.failed),
        "seconds": report.seconds,
        "manifest": report.manifest_uri,
        "model": report.model,
        "model_id": report.model_id,
    }
    message = f"{report.done} colorized, {report.skipped} skipped, {len(report.failed)} failed of {report.inputs}"
    return Completed(message=message + (f"; see {report.manifest_uri}" if report.failed else ""), data=result)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    colorize_archive_flow(source=sys.argv[1], out=sys.argv[2], model=sys.argv[3])
