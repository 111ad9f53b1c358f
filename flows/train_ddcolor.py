"""Prefect 3 flow ``train-ddcolor``: ingest -> validate -> (skip?) -> train -> evaluate -> gate/promote -> colorize.

Thin on purpose: every task calls `ddcolor.pipeline` (one function each, bar ``fingerprint``, which needs three), and
the pipeline runs without Prefect too (``ddcolor pipeline --no-prefect``). Run it::

    python flows/train_ddcolor.py                                  # once, ephemeral Prefect, params.yaml as is
    ddcolor pipeline train.max_steps=50                            # the same through the CLI
    prefect deploy --all && prefect deployment run train-ddcolor/local -p 'train={"max_steps": 50}'

Parameters mirror the sections of ``params.yaml``: ``train={"max_steps": 50, "lr": 3e-4}`` is merged onto the file
(``train.max_steps=50 train.lr=0.0003``). Endpoints come from the environment (``MLFLOW_TRACKING_URI``,
``AWS_ENDPOINT_URL``, ...), never from parameters. Set ``PREFECT_LOGGING_EXTRA_LOGGERS=ddcolor`` to see the
library's log lines in the Prefect UI.

Ingestion fans out over a Prefect task runner when ``ingest_task_runner`` is set (``thread``, ``process``, ``dask``,
``dask://host:port``, ``ray``, ``ray://host:port``): the ingest task maps a ``prepare-batch`` task over batches of
input files on that runner and writes the shards from the results, in input order (the same dataset as without).
The batch function and the mapper come from the installed package (`ddcolor.fanout`), so a Dask or Ray cluster
that has ``ddcolor`` installed runs them (``dask worker`` in any folder; it needs no checkout).

Final states:

* Completed, message ``promoted: ...``: the new model is the champion.
* Completed, message ``not promoted: <failed gates>``: the pipeline worked and the model was evaluated, registered
  (alias ``challenger``) and judged; it simply was not good enough. This is not a failure of the run, so it is not
  a Failed state: Failed is kept for broken runs (bad data, crashed training, unreachable services), so that an
  alert on Failed always means someone has to act.
* Completed, message ``skipped: ...``: the champion was trained on this very dataset version and config (see
  `ddcolor.pipeline.fingerprint`); only ingest + validation ran (seconds). ``force=True`` retrains.
* Failed: validation failed (before training; the report is a Markdown artifact and nothing is registered), or a
  step raised. Tasks retry only errors a retry can fix (`ddcolor.pipeline.is_transient`: S3 or MLflow unreachable).

Every run leaves artifacts: ``train-ddcolor-summary`` (dataset version, metrics vs thresholds vs champion,
decision, MLflow run), ``train-ddcolor-sample-grid`` (the champion's colorized sample photos), and when MLflow is an
HTTP server ``train-ddcolor-mlflow-run`` (a link). The MLflow run is tagged ``prefect.flow_run_id`` /
``prefect.flow_run_name`` (and ``prefect.flow_run_url`` when ``PREFECT_UI_URL`` is set); the flow run is tagged
``mlflow_run_id:<id>``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, Completed, State

from ddcolor import fanout, pipeline, registry
from ddcolor.config import Config, EnvSettings, load_config
from ddcolor.fanout import TASK_RUNNERS
from ddcolor.launch import Rendezvous
from ddcolor.tracking import client as tracking_client

fanout.pickle_flow_module_by_value(__name__)  # Dask/Ray workers get this flow with each task; they lack `flows`

__all__ = ["ARTIFACT_KEYS", "INGEST_TASK_RUNNERS", "build_ingest_task_runner", "train_ddcolor"]

ARTIFACT_KEYS = {
    "summary": "train-ddcolor-summary",
    "validation": "train-ddcolor-validation",
    "grid": "train-ddcolor-sample-grid",
    "mlflow": "train-ddcolor-mlflow-run",
    "model_card": "ddcolor-model-card",
}


def _retry_if_transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry only what a retry can fix (S3 / MLflow unreachable); never bad data, gates, config or divergence."""
    try:
        state.result()
    except Exception as err:
        return pipeline.is_transient(err)
    return False


# Waits between attempts, s: long enough for a restarted MLflow / MinIO pod to come back.
RETRY = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": _retry_if_transient}


INGEST_TASK_RUNNERS = TASK_RUNNERS
INGEST_IN_FLIGHT = fanout.IN_FLIGHT  # prepare-batch tasks submitted ahead of the one whose results are being written


def build_ingest_task_runner(spec: str) -> Any:
    """The task runner named by the flow parameter ``ingest_task_runner`` (`ddcolor.fanout.build_task_runner`)."""
    return fanout.build_task_runner(spec, what="ingest_task_runner")


@task(name="ingest", **RETRY)
def ingest_task(config: Config, source: str | None, task_runner: str | None = None) -> dict[str, Any]:
    """``task_runner``: fan the per-file work out as ``prepare-batch`` tasks on it (`build_ingest_task_runner`)."""
    mapper = fanout.TaskRunnerMapper(build_ingest_task_runner(task_runner)) if task_runner else None
    report = pipeline.ingest_step(config, source, map_batches=mapper)
    get_run_logger().info(report.summary())
    return {"ingested": report.ingested, "duplicates": report.duplicates, "total_rows": report.total_rows}


@task(name="validate")
def validate_task(config: Config, report_dir: str) -> str | None:
    """The report's URI; raises `ValidationFailed` (never retried: the same data fails the same way)."""
    result = pipeline.validate_step(config, report_dir=report_dir)
    return next((u for u in result.report_uris if u.endswith(".md")), None)


@task(name="fingerprint", **RETRY)
def fingerprint_task(
    config: Config, tracking_uri: str
) -> tuple[dict[str, Any], pipeline.Fingerprint, registry.ChampionInfo | None]:
    from ddcolor.data.version import dataset_version

    dataset = dataset_version(config.data.shards_uri)
    champion = registry.champion_info(config, tracking_uri=tracking_uri)
    return dataset.to_dict(), pipeline.fingerprint(config, dataset), champion


@task(name="train", **RETRY)
def train_task(
    config: Config,
    out_dir: str,
    tags: dict[str, str],
    nproc_per_node: int,
    tracking_uri: str,
    rendezvous: Rendezvous | None = None,
):
    """Retried only when MLflow was unreachable at the start (before any step ran): a diverged run is not.

    SIGTERM / SIGINT (Prefect cancellation, eviction) stop training after the current step and a checkpoint: the task
    then ends Cancelled with the trainer's "stopped at step N; resume with ..." line, not a traceback.
    """
    from ddcolor.train import TrainingStopped

    dataset = config.data.shards_uri
    try:
        if nproc_per_node > 1 or (rendezvous is not None and not rendezvous.standalone):
            return pipeline.train_distributed_step(
                config,
                dataset,
                out_dir=out_dir,
                nproc_per_node=nproc_per_node,
                tracking_uri=tracking_uri,
                tags=tags,
                rendezvous=rendezvous,
            )
        return pipeline.train_step(
            config, dataset, out_dir=out_dir, tracking_uri=tracking_uri, tags=tags, progress=False
        )
    except TrainingStopped as stop:
        get_run_logger().warning("%s", stop)
        return Cancelled(message=str(stop))


@task(name="evaluate", **RETRY)
def evaluate_task(
    config: Config, checkpoint_path: str, run_id: str, out_dir: str, tracking_uri: str
) -> dict[str, float]:
    result = pipeline.evaluate_step(
        config,
        config.data.shards_uri,
        checkpoint_path=checkpoint_path,
        run_id=run_id,
        tracking_uri=tracking_uri,
        out_dir=out_dir,
        progress=False,
    )
    return {**result.metrics, "n_images": result.n_images}


@task(name="promote", **RETRY)
def promote_task(config: Config, run_id: str, fp: pipeline.Fingerprint, tracking_uri: str) -> pipeline.PromotionOutcome:
    return pipeline.promote_step(config, run_id, fp=fp, tracking_uri=tracking_uri)


@task(name="colorize", **RETRY)
def colorize_task(config: Config, out_dir: str, run_id: str | None, tracking_uri: str) -> tuple[str, str | None]:
    """The champion's sample grid (local path) and, when MLflow is an HTTP server, its URL there."""
    grid = str(pipeline.colorize_step(config, out_dir=out_dir, tracking_uri=tracking_uri).grid)
    return grid, pipeline.log_grid(run_id, grid, tracking_uri=tracking_uri) if run_id else None


def _flow_run_tags() -> dict[str, str]:
    tags = {"prefect.flow_run_id": str(current_flow_run.id), "prefect.flow_run_name": str(current_flow_run.name)}
    if current_flow_run.ui_url:  # only when PREFECT_UI_URL is set
        tags["prefect.flow_run_url"] = current_flow_run.ui_url
    return tags


def _tag_flow_run(tag: str) -> None:
    """Add `tag` to this flow run (best effort: a failure is logged, the run goes on)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(current_flow_run.id)
            client.update_flow_run(current_flow_run.id, tags=sorted({*run.tags, tag}))
    except Exception as err:
        get_run_logger().warning("could not tag the flow run with %s: %s", tag, err)


def _publish(result: pipeline.PipelineResult) -> None:
    """The run's artifacts: Markdown summary, MLflow link, sample grid."""
    create_markdown_artifact(
        result.to_markdown(), key=ARTIFACT_KEYS["summary"], description=f"train-ddcolor: {result.status}"
    )
    if result.run_url:
        create_link_artifact(result.run_url, link_text=f"MLflow run {result.run_id}", key=ARTIFACT_KEYS["mlflow"])
    if result.grid_url:
        create_image_artifact(result.grid_url, key=ARTIFACT_KEYS["grid"], description="champion on the sample photos")
    elif result.grid:
        # An image artifact needs an HTTP URL; a local MLflow store has none, so name the file instead.
        create_markdown_artifact(
            f"Sample grid (gray input | colorized by the champion | original): `{Path(result.grid).resolve()}`",
            key=ARTIFACT_KEYS["grid"],
            description="champion on the sample photos",
        )


@flow(name="train-ddcolor")
def train_ddcolor(
    config_path: str | None = "params.yaml",
    source: str | None = None,
    data: dict[str, Any] | None = None,
    validate: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    eval: dict[str, Any] | None = None,
    gates: dict[str, Any] | None = None,
    registry: dict[str, Any] | None = None,
    force: bool = False,
    work_dir: str = "runs/pipeline",
    nproc_per_node: int = 1,
    colorize: bool = True,
    ingest_task_runner: str | None = None,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> State:
    """Retrain DDColor when data or config changed; promote the model if it passes the gates (see module docstring).

    Args:
        config_path: params.yaml to start from (relative to the working directory); None = built-in defaults.
        source: raw images (folder or ``s3://``); default ``data.source``.
        data, validate, model, train, eval, gates, registry: keys merged onto those sections of the file.
        force: train even when the champion has the same data and config.
        work_dir: local folder for reports, training outputs and the sample grid.
        nproc_per_node: GPUs (processes) for ``torchrun`` DDP training; 1 = train in the task's process.
        nnodes, node_rank, rdzv_endpoint, rdzv_id: multi-node training (`ddcolor.launch.Rendezvous`, c10d): this
            flow run is node ``node_rank`` of ``nnodes``; the other nodes run the same torchrun command (e.g. the
            pods of infra/k8s/examples/train-multinode-job.yaml). rdzv_id defaults to the flow run's id.
        colorize: colorize the sample photos with the champion at the end.
        ingest_task_runner: fan ingestion out as ``prepare-batch`` tasks on this task runner: ``thread``,
            ``process``, ``dask`` (a local cluster) or ``dask://host:port``, ``ray`` or ``ray://host:port``
            (the cluster needs ``ddcolor`` installed). None: the local process pool
            (``data.num_workers``).

    Returns:
        A Completed state whose message says promoted / not promoted / skipped and whose result is the
        `ddcolor.pipeline.PipelineResult` as a dict.
    """
    logger = get_run_logger()
    overrides = pipeline.section_overrides(
        data=data, validate=validate, model=model, train=train, eval=eval, gates=gates, registry=registry
    )
    if not sys.stdout.isatty():  # MLflow's artifact download bars flood worker logs; keep them for terminals
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = load_config(config_path, overrides)  # a bad key fails the run here, before any work
    if ingest_task_runner:
        build_ingest_task_runner(ingest_task_runner)  # so does an unknown or missing task runner
    rendezvous = Rendezvous(nnodes, node_rank, rdzv_endpoint, run_id=rdzv_id or str(current_flow_run.id))
    tracking_uri = EnvSettings.from_env().mlflow_tracking_uri  # read once; every task gets it explicitly
    work = Path(work_dir)

    ingest_task(cfg, source, ingest_task_runner)
    try:
        report = validate_task(cfg, str(work / "validation"))
    except pipeline.ValidationFailed as err:
        create_markdown_artifact(
            err.result.to_markdown(), key=ARTIFACT_KEYS["validation"], description="dataset validation FAILED"
        )
        _publish(
            pipeline.PipelineResult(
                "validation_failed", str(err), tracking_uri=tracking_uri, validation_report=err.report_uri
            )
        )
        raise
    dataset, fp, champion = fingerprint_task(cfg, tracking_uri)
    skip, why = pipeline.should_skip(fp, champion, force=force)
    result = pipeline.PipelineResult(
        "skipped", why, dataset=dataset, fingerprint=fp.value, tracking_uri=tracking_uri, validation_report=report
    )
    result.champion_version = champion.version if champion else None

    if not skip:
        logger.info("training: %s", why)
        out_dir = work / "runs" / str(current_flow_run.name or current_flow_run.id)
        trained = train_task(
            cfg,
            str(out_dir),
            {**fp.as_tags(), **_flow_run_tags()},
            nproc_per_node,
            tracking_uri,
            rendezvous,
            return_state=True,
        )
        if trained.is_cancelled():  # stopped by a signal: the flow ends Cancelled with the trainer's line
            return Cancelled(message=trained.message)
        trained = trained.result()
        if trained.run_id is None:
            raise RuntimeError("training logged no MLflow run; the flow needs one to gate and register the model")
        _tag_flow_run(f"mlflow_run_id:{trained.run_id}")
        result.run_id = trained.run_id
        result.run_url = tracking_client.run_url(trained.run_id, tracking_uri=tracking_uri)
        result.metrics = evaluate_task(
            cfg, trained.checkpoint_path, trained.run_id, str(out_dir / "eval"), tracking_uri
        )
        outcome = promote_task(cfg, trained.run_id, fp, tracking_uri)
        if outcome.model_card:
            create_markdown_artifact(
                outcome.model_card,
                key=ARTIFACT_KEYS["model_card"],
                description=f"model card of {cfg.registry.model_name} v{outcome.version}",
            )
        result.status = "promoted" if outcome.promoted else "not_promoted"
        result.reason = outcome.reason
        result.decision, result.gate_table = outcome.decision.to_dict(), outcome.decision.table()
        result.model_version, result.champion_version = outcome.version, outcome.champion_version

    if colorize and result.champion_version:
        result.grid, result.grid_url = colorize_task(cfg, str(work / "samples"), result.run_id, tracking_uri)
    _publish(result)
    logger.info(result.summary())
    prefix = {"promoted": "promoted", "not_promoted": "not promoted", "skipped": "skipped"}[result.status]
    message = result.reason if result.reason.startswith(prefix) else f"{prefix}: {result.reason}"
    return Completed(message=message, data=result.to_dict())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    train_ddcolor()
