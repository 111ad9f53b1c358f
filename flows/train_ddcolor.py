"""Prefect 3 flow ``train-ddcolor``: ingest -> validate -> (skip?) -> train -> evaluate -> gate/promote -> colorize.

Thin on purpose: the control flow is `ddcolor.pipeline.run_pipeline`, the same one ``ddcolor pipeline --no-prefect``
runs; this flow passes it task-wrapped steps (`prefect_steps`: every task calls one `ddcolor.pipeline` step) and adds
the Prefect artifacts and states. Run it::

    python flows/train_ddcolor.py                                  # once, ephemeral Prefect, params.yaml as is
    ddcolor pipeline train.max_steps=50                            # the same through the CLI
    prefect deploy --all && prefect deployment run train-ddcolor/local -p 'train={"max_steps": 50}'

Parameters mirror the sections of ``params.yaml``: ``train={"max_steps": 50, "lr": 3e-4}`` is merged onto the file
(``train.max_steps=50 train.lr=0.0003``). Endpoints come from the environment (``MLFLOW_TRACKING_URI``,
``AWS_ENDPOINT_URL``, ...), never from parameters. Set ``PREFECT_LOGGING_EXTRA_LOGGERS=ddcolor`` to see the
library's log lines in the Prefect UI.

Ingestion fans out over a Prefect task runner when ``ingest_task_runner`` is set (``thread``, ``process``, ``dask``,
``dask://host:port``, ``ray``, ``ray://host:port``): the ingest task maps ``hash-batch`` tasks over batches of input
files, then ``write-shard`` tasks (one per shard) on that runner; the workers write the shards themselves and the
task commits the manifest (the same dataset as without). The job functions and the mapper come from the installed
package (`ddcolor.data.ingest_jobs`, `ddcolor.fanout`), so a Dask or Ray cluster that has ``ddcolor`` installed
runs them (``dask worker`` in any folder; it needs no checkout).

Final states:

* Completed, message ``promoted: ...``: the new model is the champion.
* With ``gates.require_approval``: a run whose gates pass is Paused (input: approve, comment, approver) until a
  person answers in the Prefect UI or with ``ddcolor approve``; then promoted, or "not promoted: rejected by ...", or
  after ``gates.approval_timeout_hours`` "not promoted: approval timed out" (`ddcolor.approval`).
* Completed, message ``not promoted: <failed gates>``: the pipeline worked and the model was evaluated, registered
  (alias ``challenger``) and judged; it simply was not good enough. This is not a failure of the run, so it is not
  a Failed state: Failed is kept for broken runs (bad data, crashed training, unreachable services), so that an
  alert on Failed always means someone has to act.
* Completed, message ``skipped: ...``: the champion was trained on this very dataset version and config (see
  `ddcolor.pipeline.fingerprint`); only ingest + validation ran (seconds). ``force=True`` retrains.
* Failed: validation failed (before training; the report is a Markdown artifact and nothing is registered), or a
  step raised. Tasks retry only errors a retry can fix (`ddcolor.pipeline.is_transient`: S3 or MLflow unreachable).

Every run leaves artifacts: ``train-ddcolor-summary`` (dataset version, metrics vs thresholds vs champion,
decision, MLflow run), ``train-ddcolor-gates`` (a table: each gate's metric, value, threshold, champion value and
verdict), ``train-ddcolor-sample-grid`` (the champion's colorized sample photos), a progress artifact updated at each
training log step, and when MLflow is an HTTP server ``train-ddcolor-mlflow-run`` (a link).

Names. A flow run is named ``train-<preset>-<UTC yyyymmdd-HHMMSS>`` when it starts and, once the fingerprint is
known and it trains, ``...-<fingerprint[:8]>`` (`ddcolor.pipeline.run_name`); that name is also the MLflow run's
name and the output folder ``work_dir/runs/<name>``.

Long runs. Ingest, evaluate and promote have ``timeout_seconds`` (`DEFAULT_TIMEOUTS_S`, flow parameter
``timeouts``). The train task persists its `TrainResult` keyed on the fingerprint (and the MLflow store and
experiment): a re-run after a late failure (evaluate, promote) reuses the finished training instead of training
again, as long as its model file is still there; ``force=True`` trains again. With ``nproc_per_node > 1`` torchrun's
output goes to the run log line by line as it comes. The MLflow run is tagged ``prefect.flow_run_id`` /
``prefect.flow_run_name`` (and ``prefect.flow_run_url`` when ``PREFECT_UI_URL`` is set); the flow run is tagged
``mlflow_run_id:<id>``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Cancelled, Completed, State

from ddcolor import fanout, pipeline, registry
from ddcolor.config import Config, EnvSettings, load_config
from ddcolor.fanout import TASK_RUNNERS
from ddcolor.launch import Rendezvous

fanout.pickle_flow_module_by_value(__name__)  # Dask/Ray workers get this flow with each task; they lack `flows`

__all__ = ["ARTIFACT_KEYS", "DEFAULT_TIMEOUTS_S", "INGEST_TASK_RUNNERS", "build_ingest_task_runner", "train_ddcolor"]

ARTIFACT_KEYS = {
    "summary": "train-ddcolor-summary",
    "gates": "train-ddcolor-gates",
    "validation": "train-ddcolor-validation",
    "grid": "train-ddcolor-sample-grid",
    "mlflow": "train-ddcolor-mlflow-run",
    "model_card": "ddcolor-model-card",
}

#: Task time limits, s (flow parameter ``timeouts`` overrides them): a hung S3 listing, metric network or registry
#: call fails the run instead of holding a worker forever. Training has none: its length is the recipe's.
DEFAULT_TIMEOUTS_S = {"ingest": 6 * 3600.0, "evaluate": 2 * 3600.0, "promote": 1800.0}


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
INGEST_IN_FLIGHT = fanout.IN_FLIGHT  # ingest job tasks submitted ahead of the one whose result is being consumed
INGEST_JOB_RETRIES = 2  # hash-batch / write-shard are idempotent (a shard's bytes depend only on its job)


def build_ingest_task_runner(spec: str) -> Any:
    """The task runner named by the flow parameter ``ingest_task_runner`` (`ddcolor.fanout.build_task_runner`)."""
    return fanout.build_task_runner(spec, what="ingest_task_runner")


@task(name="ingest", timeout_seconds=DEFAULT_TIMEOUTS_S["ingest"], **RETRY)
def ingest_task(config: Config, source: str | None, task_runner: str | None = None) -> dict[str, Any]:
    """``task_runner``: fan the work out as ``hash-batch`` and ``write-shard`` tasks on it
    (`build_ingest_task_runner`)."""
    mapper = None
    if task_runner:
        mapper = fanout.TaskRunnerMapper(build_ingest_task_runner(task_runner), retries=INGEST_JOB_RETRIES)
    report = pipeline.ingest_step(config, source, map_batches=mapper)
    get_run_logger().info(report.summary())
    return {"ingested": report.ingested, "duplicates": report.duplicates, "total_rows": report.total_rows}


@task(name="validate")
def validate_task(config: Config, report_dir: str) -> str | None:
    """The report's URI; raises `ValidationFailed` (never retried: the same data fails the same way)."""
    return pipeline.validate_report_step(config, report_dir=report_dir)


@task(name="fingerprint", **RETRY)
def fingerprint_task(
    config: Config, tracking_uri: str
) -> tuple[dict[str, Any], pipeline.Fingerprint, registry.ChampionInfo | None]:
    return pipeline.fingerprint_step(config, tracking_uri)


def _training_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """One finished training per fingerprint, MLflow store and experiment (`train_task`'s persisted result)."""
    config: Config = parameters["config"]
    fp = parameters["tags"][registry.FINGERPRINT_TAG]
    return f"train-ddcolor-{fp}-{pipeline._sha256_json([parameters['tracking_uri'], config.registry.experiment_name])}"


_STEP_LINE = re.compile(r"step (\d+)/(\d+)")  # the trainer's log line: "step 20/2000 | loss_g ... | ETA ..."


@task(name="train", cache_key_fn=_training_cache_key, persist_result=True, **RETRY)
def train_task(
    config: Config,
    out_dir: str,
    tags: dict[str, str],
    nproc_per_node: int,
    tracking_uri: str,
    rendezvous: Rendezvous | None = None,
    run_name: str | None = None,
):
    """Retried only when MLflow was unreachable at the start (before any step ran): a diverged run is not.

    Progress: a progress artifact updated at each training log step (in this process from the trainer; with torchrun
    from its streamed ``step N/M`` lines, which go to the run log as they come).

    SIGTERM / SIGINT (Prefect cancellation, eviction) stop training after the current step and a checkpoint: the task
    then ends Cancelled with the trainer's "stopped at step N; resume with ..." line, not a traceback.
    """
    from ddcolor.train import TrainingStopped

    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, description=f"training {run_name or out_dir}: % of train.max_steps")

    def on_progress(step: int, total: int) -> None:
        update_progress_artifact(progress_id, round(100.0 * min(step, total) / max(total, 1), 2))

    def on_line(line: str) -> None:
        logger.info("%s", line)
        if match := _STEP_LINE.search(line):
            on_progress(int(match[1]), int(match[2]))

    try:
        return pipeline.train_model_step(
            config,
            config.data.shards_uri,
            out_dir=out_dir,
            tracking_uri=tracking_uri,
            tags=tags,
            run_name=run_name,
            progress=False,
            nproc_per_node=nproc_per_node,
            rendezvous=rendezvous,
            on_progress=on_progress,
            on_line=on_line,
        )
    except TrainingStopped as stop:
        logger.warning("%s", stop)
        return Cancelled(message=str(stop))


@task(name="evaluate", timeout_seconds=DEFAULT_TIMEOUTS_S["evaluate"], **RETRY)
def evaluate_task(
    config: Config, checkpoint_path: str, run_id: str, out_dir: str, tracking_uri: str
) -> dict[str, float]:
    return pipeline.evaluate_metrics_step(
        config,
        config.data.shards_uri,
        checkpoint_path=checkpoint_path,
        run_id=run_id,
        tracking_uri=tracking_uri,
        out_dir=out_dir,
        progress=False,
    )


@task(name="promote", timeout_seconds=DEFAULT_TIMEOUTS_S["promote"], **RETRY)
def promote_task(config: Config, run_id: str, fp: pipeline.Fingerprint, tracking_uri: str) -> pipeline.PromotionOutcome:
    return pipeline.promote_step(config, run_id, fp=fp, tracking_uri=tracking_uri)


@task(name="colorize", **RETRY)
def colorize_task(config: Config, out_dir: str, run_id: str | None, tracking_uri: str) -> tuple[str, str | None]:
    """The champion's sample grid (local path) and, when MLflow is an HTTP server, its URL there."""
    return pipeline.colorize_grid_step(config, out_dir=out_dir, run_id=run_id, tracking_uri=tracking_uri)


def _flow_run_tags(name: str) -> dict[str, str]:
    tags = {"prefect.flow_run_id": str(current_flow_run.id), "prefect.flow_run_name": name}
    if current_flow_run.ui_url:  # only when PREFECT_UI_URL is set
        tags["prefect.flow_run_url"] = current_flow_run.ui_url
    return tags


def _update_flow_run(*, tag: str | None = None, name: str | None = None) -> None:
    """Add `tag` to this flow run and/or rename it (best effort: a failure is logged, the run goes on)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(current_flow_run.id)
            client.update_flow_run(current_flow_run.id, name=name, tags=sorted({*run.tags, tag}) if tag else None)
    except Exception as err:
        get_run_logger().warning("could not update the flow run (tag %s, name %s): %s", tag, name, err)


def _start_name() -> str:
    """The flow run's name when it starts: ``train-<preset>-<UTC yyyymmdd-HHMMSS>`` (the fingerprint comes later)."""
    params = current_flow_run.parameters or {}
    preset = (params.get("model") or {}).get("preset")
    if preset is None:
        try:
            preset = load_config(params.get("config_path", "params.yaml")).model.preset
        except Exception:  # the flow itself reports a bad config; the name only needs a guess
            preset = "ddcolor"
    return f"train-{preset}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


class _TrainingCancelled(Exception):
    """The train task ended Cancelled (a signal stopped training); the flow ends Cancelled with its message."""


def prefect_steps(
    *, ingest_task_runner: str | None, timeouts: dict[str, float], force: bool, failures: list[BaseException]
) -> pipeline.Steps:
    """`ddcolor.pipeline.Steps` that run each step as a task of this flow run (same signatures and results), plus the
    Prefect side effects: the validation artifact, the flow run's name and MLflow tag, the model card artifact.
    A failed validation is also appended to `failures` (the flow fails with it after its summary)."""
    ingest = ingest_task.with_options(timeout_seconds=timeouts["ingest"])
    evaluate = evaluate_task.with_options(timeout_seconds=timeouts["evaluate"])
    promote = promote_task.with_options(timeout_seconds=timeouts["promote"])

    def ingest_step(config: Config, source: str | None, *, progress: bool) -> dict[str, Any]:
        return ingest(config, source, ingest_task_runner)

    def validate_step(config: Config, *, report_dir: str) -> str | None:
        try:
            return validate_task(config, report_dir)
        except pipeline.ValidationFailed as err:
            create_markdown_artifact(
                err.result.to_markdown(), key=ARTIFACT_KEYS["validation"], description="dataset validation FAILED"
            )
            failures.append(err)
            raise

    def name_step(config: Config, fp: pipeline.Fingerprint) -> str:
        start = str(current_flow_run.name or "")
        name = f"{start}-{fp.value[:8]}" if start.startswith("train-") else pipeline.run_name(config, fp)
        _update_flow_run(name=name)
        return name

    def train_step(config: Config, dataset_uri: str, *, out_dir: str, tracking_uri: str, tags, run_name: str,
                   progress: bool, nproc_per_node: int, rendezvous: Rendezvous | None):  # fmt: skip
        tags = {**tags, **_flow_run_tags(run_name)}
        args = (config, out_dir, tags, nproc_per_node, tracking_uri, rendezvous, run_name)
        state = train_task.with_options(refresh_cache=force)(*args, return_state=True)
        if state.is_completed() and not Path(state.result().checkpoint_path).is_file():
            get_run_logger().info("the cached training's model file is gone; training again")
            state = train_task.with_options(refresh_cache=True)(*args, return_state=True)
        if state.is_cancelled():
            raise _TrainingCancelled(state.message)
        trained = state.result()
        if trained.run_id:
            _update_flow_run(tag=f"mlflow_run_id:{trained.run_id}")
        return trained

    def evaluate_step(config: Config, dataset_uri: str, *, checkpoint_path: str, run_id: str, tracking_uri: str,
                      out_dir: str, progress: bool) -> dict[str, float]:  # fmt: skip
        return evaluate(config, checkpoint_path, run_id, out_dir, tracking_uri)

    def promote_step(config: Config, run_id: str, *, fp: pipeline.Fingerprint, tracking_uri: str, attach_onnx: bool):
        outcome = promote(config, run_id, fp, tracking_uri)
        if outcome.pending_approval:  # gates.require_approval: pause for a person (Prefect UI / ddcolor approve)
            from ddcolor.approval import await_approval

            outcome = await_approval(config, outcome, tracking_uri=tracking_uri)
        if outcome.model_card:
            create_markdown_artifact(
                outcome.model_card,
                key=ARTIFACT_KEYS["model_card"],
                description=f"model card of {config.registry.model_name} v{outcome.version}",
            )
        return outcome

    def colorize_step(config: Config, *, out_dir: str, run_id: str | None, tracking_uri: str):
        return colorize_task(config, out_dir, run_id, tracking_uri)

    return pipeline.Steps(
        ingest=ingest_step,
        validate=validate_step,
        fingerprint=fingerprint_task,
        name=name_step,
        train=train_step,
        evaluate=evaluate_step,
        promote=promote_step,
        colorize=colorize_step,
    )


def _gate_rows(result: pipeline.PipelineResult) -> list[dict[str, Any]]:
    """One row per gate check (metric, value, operator, threshold, champion value, images, verdict), then one per
    measured metric no gate looks at (no threshold, no verdict), so the table shows every number."""
    checks = (result.decision or {}).get("checks", [])
    rows = [
        {
            "gate": c.get("name"),
            "metric": c.get("metric"),
            "value": c.get("value"),
            "op": c.get("op"),
            "threshold": c.get("threshold"),
            "champion": c.get("champion_value"),
            "n_images": c.get("n_images"),
            "passed": c.get("passed"),
            "reason": c.get("reason"),
        }
        for c in checks
    ]
    gated = {c.get("metric") for c in checks}
    n_images = result.metrics.get("n_images")
    for metric, value in result.metrics.items():
        if metric != "n_images" and metric not in gated:
            rows.append(
                {"gate": None, "metric": metric, "value": value, "op": None, "threshold": None, "champion": None}
                | {"n_images": n_images, "passed": None, "reason": "no gate on this metric"}
            )
    return rows


def _publish(result: pipeline.PipelineResult) -> None:
    """The run's artifacts: Markdown summary, gates table, MLflow link, sample grid."""
    create_markdown_artifact(
        result.to_markdown(), key=ARTIFACT_KEYS["summary"], description=f"train-ddcolor: {result.status}"
    )
    if result.decision:
        create_table_artifact(
            _gate_rows(result),
            key=ARTIFACT_KEYS["gates"],
            description="metrics vs thresholds vs champion: gate "
            + ("PASSED" if result.decision["passed"] else "FAILED"),
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


@flow(name="train-ddcolor", flow_run_name=_start_name)
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
    timeouts: dict[str, float] | None = None,
) -> State:
    """Retrain DDColor when data or config changed; promote the model if it passes the gates (see module docstring).

    Args:
        config_path: params.yaml to start from (relative to the working directory); None = built-in defaults.
        source: raw images (folder or ``s3://``); default ``data.source``.
        data, validate, model, train, eval, gates, registry: keys merged onto those sections of the file.
        force: train even when the champion has the same data and config (and do not reuse a finished training).
        work_dir: local folder for reports, training outputs (``runs/<run name>``) and the sample grid.
        nproc_per_node: GPUs (processes) for ``torchrun`` DDP training; 1 = train in the task's process.
        nnodes, node_rank, rdzv_endpoint, rdzv_id: multi-node training (`ddcolor.launch.Rendezvous`, c10d): this
            flow run is node ``node_rank`` of ``nnodes``; the other nodes run the same torchrun command (e.g. the
            pods of infra/k8s/examples/train-multinode-job.yaml). rdzv_id defaults to the flow run's id.
        colorize: colorize the sample photos with the champion at the end.
        ingest_task_runner: fan ingestion out as ``hash-batch`` / ``write-shard`` tasks on this task runner: ``thread``,
            ``process``, ``dask`` (a local cluster) or ``dask://host:port``, ``ray`` or ``ray://host:port``
            (the cluster needs ``ddcolor`` installed). None: the local process pool
            (``data.num_workers``).
        timeouts: task time limits in s, ``{"ingest": ..., "evaluate": ..., "promote": ...}`` merged onto
            `DEFAULT_TIMEOUTS_S`.

    Returns:
        A Completed state whose message says promoted / not promoted / skipped and whose result is the
        `ddcolor.pipeline.PipelineResult` as a dict; Cancelled when a signal stopped training.
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
    unknown = set(timeouts or {}) - set(DEFAULT_TIMEOUTS_S)
    if unknown:
        raise ValueError(f"timeouts: unknown task(s) {sorted(unknown)}; known: {sorted(DEFAULT_TIMEOUTS_S)}")
    failures: list[BaseException] = []
    steps = prefect_steps(
        ingest_task_runner=ingest_task_runner,
        timeouts={**DEFAULT_TIMEOUTS_S, **(timeouts or {})},
        force=force,
        failures=failures,
    )
    try:
        result = pipeline.run_pipeline(
            cfg,
            source,
            work_dir=work_dir,
            force=force,
            progress=False,
            tracking_uri=EnvSettings.from_env().mlflow_tracking_uri,  # read once; every task gets it explicitly
            colorize=colorize,
            nproc_per_node=nproc_per_node,
            rendezvous=Rendezvous(nnodes, node_rank, rdzv_endpoint, run_id=rdzv_id or str(current_flow_run.id)),
            steps=steps,
        )
    except _TrainingCancelled as stopped:  # stopped by a signal: the flow ends Cancelled with the trainer's line
        return Cancelled(message=str(stopped))
    _publish(result)
    if result.status == "validation_failed":
        raise failures[0] if failures else RuntimeError(result.reason)
    logger.info(result.summary())
    return Completed(message=result.status_message, data=result.to_dict())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    train_ddcolor()
