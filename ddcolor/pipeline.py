"""The whole retraining pipeline as plain functions: ingest -> validate -> (skip?) -> train -> evaluate -> gate ->
promote -> colorize. No Prefect here: the `train-ddcolor` flow (``flows/train_ddcolor.py``) runs each step as a
task; `run_pipeline` runs them in order in this process (``ddcolor pipeline --no-prefect``, benchmarks, tests).
The CLI's single steps call the same functions: ``ddcolor train`` (`train_step`), ``finetune`` (`finetune_step`),
``evaluate`` (`evaluate_network`), ``promote`` (`promotion_record`, `rollback_record`).

Usage::

    cfg = load_config("params.yaml", overrides=["train.max_steps=50"])
    result = run_pipeline(cfg, "data/raw", work_dir="runs/pipeline")
    result.status        # promoted | not_promoted | skipped | validation_failed
    print(result.to_markdown())

Skipping. A model is determined by its data and its recipe, so each trained model carries a *fingerprint*: the
sha256 of the dataset version (the sha256 of the shard manifest, which lists every shard's sha256) and of the
config sections ``data``, ``validate``, ``model``, ``train``, ``eval`` (canonical JSON, minus
`FINGERPRINT_IGNORED`: locations and logging knobs that do not change the model). The registered version is tagged
``pipeline.fingerprint`` (plus ``pipeline.dataset_sha256`` and ``pipeline.config_sha256``, so a person can see which
half changed). When the champion's fingerprint equals the new one, training is skipped unless forced: a scheduled
run on unchanged data costs an ingest (incremental: new raw images do change the dataset version) and a validation,
not a training.

Failures. A failed validation raises `ValidationFailed` (nothing is trained or registered; the report is written
first). A failed gate is not an error: the version is registered (alias ``challenger``, with its ``blessing`` tag
saying why) and the champion stays. `is_transient` tells the flow which errors a retry can fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ddcolor.errors import DDColorError
from ddcolor.launch import Rendezvous
from ddcolor.registry import CONFIG_SHA_TAG, DATASET_SHA_TAG, FINGERPRINT_TAG, ChampionInfo, champion_info
from ddcolor.tracking import client as tracking_client
from ddcolor.tracking.client import run_url

if TYPE_CHECKING:
    from ddcolor.config import Config
    from ddcolor.data.ingest import BatchMapper, IngestReport
    from ddcolor.data.validate import ValidationResult
    from ddcolor.data.version import DatasetVersion
    from ddcolor.demo import DemoResult
    from ddcolor.evaluate import EvalResult
    from ddcolor.gates import GateDecision
    from ddcolor.train import TrainResult

__all__ = [
    "FINGERPRINT_IGNORED",
    "FINGERPRINT_SECTIONS",
    "Fingerprint",
    "PipelineResult",
    "PromotionOutcome",
    "Steps",
    "ValidationFailed",
    "colorize_grid_step",
    "colorize_step",
    "evaluate_metrics_step",
    "evaluate_network",
    "evaluate_step",
    "finetune_step",
    "fingerprint",
    "fingerprint_step",
    "ingest_step",
    "is_transient",
    "log_grid",
    "promote_step",
    "promotion_record",
    "read_train_result",
    "rollback_record",
    "run_name",
    "run_pipeline",
    "section_overrides",
    "should_skip",
    "torchrun_command",
    "train_distributed_step",
    "train_model_step",
    "train_step",
    "validate_report_step",
    "validate_step",
]

log = logging.getLogger(__name__)

Status = Literal["promoted", "not_promoted", "skipped", "validation_failed"]

#: Config sections that determine the trained model (``gates`` and ``registry`` decide what happens to it);
#: ``validate`` decides which data may be trained on at all.
FINGERPRINT_SECTIONS = ("data", "validate", "model", "train", "eval")
#: Keys of those sections that do not change the model: where things are, how often to log, how many loader workers.
FINGERPRINT_IGNORED = frozenset(
    {
        "data.source",
        "data.shards_uri",
        "data.num_workers",
        "train.checkpoint_dir",
        "train.checkpoint_every",
        "train.keep_last",
        "train.log_every",
    }
)
GRID_ARTIFACT_DIR = "samples"  # MLflow run artifact folder of the sample grid


class ValidationFailed(DDColorError, RuntimeError):
    """The dataset failed validation; nothing was trained. ``result`` holds every check, ``report_uri`` the report."""

    def __init__(self, result: ValidationResult, report_uri: str | None) -> None:
        self.result = result
        self.report_uri = report_uri
        failed = ", ".join(c.name for c in result.failures) or "?"
        super().__init__(
            f"dataset {result.uri} failed validation ({len(result.failures)} failed checks: {failed}); report: "
            f"{report_uri or '(not written)'}. Nothing was trained or promoted: fix or remove the bad images or "
            "shards, then rerun."
        )


# --- fingerprint and skip --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What a model is made of. ``value`` = sha256 over ``dataset_sha256`` and ``config_sha256`` (hex digests)."""

    value: str
    dataset_sha256: str
    config_sha256: str

    def as_tags(self) -> dict[str, str]:
        return {FINGERPRINT_TAG: self.value, DATASET_SHA_TAG: self.dataset_sha256, CONFIG_SHA_TAG: self.config_sha256}


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(config: Config, dataset: DatasetVersion | str) -> Fingerprint:
    """The fingerprint of training `config` on `dataset` (a `DatasetVersion` or its manifest sha256).

    Only `FINGERPRINT_SECTIONS` count, minus `FINGERPRINT_IGNORED`: changing a gate, the registry names, a path or
    the number of loader workers does not change it; changing the data or any training setting does.
    """
    dataset_sha = dataset if isinstance(dataset, str) else dataset.manifest_sha256
    recipe = {
        key: value
        for key, value in config.to_flat_dict().items()
        if key.split(".", 1)[0] in FINGERPRINT_SECTIONS and key not in FINGERPRINT_IGNORED
    }
    config_sha = _sha256_json(recipe)
    return Fingerprint(_sha256_json({"dataset": dataset_sha, "config": config_sha}), dataset_sha, config_sha)


def _client(tracking_uri: str | None):
    return tracking_client.client(tracking_uri)


def _tracking_uri(tracking_uri: str | None) -> str:
    return tracking_client.tracking_uri(tracking_uri)


def should_skip(fp: Fingerprint, champion: ChampionInfo | None, *, force: bool = False) -> tuple[bool, str]:
    """Whether to skip training, and why (one line either way)."""
    if champion is None:
        return False, "no champion yet"
    if champion.fingerprint is None:
        return False, f"champion v{champion.version} has no {FINGERPRINT_TAG} tag (registered outside the pipeline)"
    if champion.fingerprint != fp.value:
        changed = [
            what
            for what, mine, theirs in (
                ("dataset", fp.dataset_sha256, champion.dataset_sha256),
                ("config", fp.config_sha256, champion.config_sha256),
            )
            if mine != theirs
        ]
        return False, f"{' and '.join(changed) or 'fingerprint'} changed since champion v{champion.version}"
    if force:
        return False, f"forced: same data and config as champion v{champion.version}, retraining anyway"
    return True, (
        f"dataset {fp.dataset_sha256[:12]} and config {fp.config_sha256[:12]} are those of champion "
        f"v{champion.version} (fingerprint {fp.value[:12]}); pass force=True to retrain"
    )


def fingerprint_step(
    config: Config, tracking_uri: str | None = None
) -> tuple[dict[str, Any], Fingerprint, ChampionInfo | None]:
    """The dataset version (as a dict), this run's `Fingerprint` and the current champion (None when there is none)."""
    from ddcolor.data.version import dataset_version

    dataset = dataset_version(config.data.shards_uri)
    champion = champion_info(config, tracking_uri=_tracking_uri(tracking_uri))
    return dataset.to_dict(), fingerprint(config, dataset), champion


def run_name(config: Config, fp: Fingerprint, now: datetime | None = None) -> str:
    """``train-<preset>-<UTC yyyymmdd-HHMMSS>-<fingerprint[:8]>``: the flow run, the MLflow run and the output folder
    ``work_dir/runs/<name>`` of one training all carry it."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return f"train-{config.model.preset}-{stamp}-{fp.value[:8]}"


# --- steps -----------------------------------------------------------------------------------------------------


def ingest_step(
    config: Config,
    source: str | None = None,
    *,
    progress: bool = False,
    num_workers: int | None = None,
    map_batches: BatchMapper | None = None,
) -> IngestReport:
    """Ingest the raw images at `source` (default ``data.source``) into ``data.shards_uri`` (incremental).

    ``map_batches`` fans the per-file work out to another executor (`ddcolor.data.ingest.ingest`); the flow passes
    one built on a Prefect task runner.
    """
    from ddcolor.data.ingest import ingest

    source = source or config.data.source
    report = ingest(
        source, config.data.shards_uri, config, num_workers=num_workers, progress=progress, map_batches=map_batches
    )
    log.info("ingest: %s", report.summary().replace("\n", "; "))
    return report


def validate_step(config: Config, dataset_uri: str | None = None, *, report_dir: str | None = None) -> ValidationResult:
    """Validate the dataset against ``config.data`` with the tolerances of ``config.validate``; always write the
    reports (to `report_dir`, default next to the data).

    Raises:
        ValidationFailed: a check failed (its message names the report).
    """
    from ddcolor.data.validate import REPORT_MARKDOWN, Tolerances, validate_dataset, write_reports

    uri = dataset_uri or config.data.shards_uri
    result = validate_dataset(uri, expected=config.data, tolerances=Tolerances.from_config(config.validate))
    try:
        written = write_reports(result, report_dir)
    except OSError as err:  # a report we cannot write must not hide the verdict
        log.warning("could not write the validation report to %s: %s", report_dir or uri, err)
        written = []
    report = next((w for w in written if w.endswith(REPORT_MARKDOWN)), None)
    if not result.success:
        raise ValidationFailed(result, report)
    log.info("validate: %s (%d rows, %d shards)", "passed", result.rows, result.shards)
    return result


def train_step(
    config: Config,
    dataset_uri: str,
    *,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    progress: bool = True,
    init: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    track: bool = True,
    resume: bool = False,
    resume_strict: bool = False,
) -> TrainResult:
    """Train in this process (one rank of it under ``torchrun``) into a new MLflow run: every param logged, `tags`
    set, the model logged to it. The tracker lives on rank 0 only; ``track=False`` trains without one.

    ``on_progress(step, max_steps)`` is called at every ``train.log_every`` step and at the last (the flow updates
    a Prefect progress artifact with it). ``resume`` continues from the newest intact checkpoint under `out_dir`;
    ``resume_strict`` also, but fails when the newest checkpoint is damaged.

    Raises:
        ddcolor.tracking.TrackingError: MLflow unreachable at start (transient).
        ddcolor.train.TrainingStopped: SIGTERM / SIGINT stopped it after a checkpoint (the run ends KILLED).
        ddcolor.train.TrainingDivergedError, ValueError: training cannot go on (not transient).
    """
    from ddcolor.tracking import start_tracker
    from ddcolor.train import TrainingStopped, train

    uri = _tracking_uri(tracking_uri)
    enabled = track and os.environ.get("RANK", "0") == "0"  # one MLflow run per training, not one per rank
    tracker = start_tracker(
        config, enabled=enabled, run_name=run_name, tracking_uri=uri, tags=tags, dataset_uri=dataset_uri
    )
    watched = _ProgressTracker(tracker, on_progress, config) if on_progress else tracker
    status = "FAILED"
    try:
        result = train(
            config, dataset_uri, out_dir=out_dir, init=init, resume=resume or resume_strict, tracker=watched,
            progress=progress, resume_strict=resume_strict,
        )  # fmt: skip
        status = "FINISHED"
    except (KeyboardInterrupt, TrainingStopped):  # a signal: the run was stopped (and checkpointed), not failed
        status = "KILLED"
        raise
    finally:
        tracker.finish(status)
    log.info("train: %d steps, run %s, model %s", result.steps, result.run_id, result.model_uri)
    return result


def finetune_step(
    config: Config,
    source: str,
    *,
    out_dir: str,
    init: str,
    resume: bool = False,
    track: bool = True,
    run_name: str | None = None,
    progress: bool = True,
    on_summary: Callable[[str], None] | None = None,
) -> TrainResult:
    """Fine-tune `init` on the images at `source`: ingest them into ``out_dir/data`` (incremental), validate that
    dataset against ``config.data`` (reports next to it), train into `out_dir` (`train_step`).

    ``on_summary(text)`` gets the ingest and validation summaries as each finishes (default: this module's
    logger); ``ddcolor finetune`` prints them.

    Raises:
        ValidationFailed: the dataset failed validation (nothing was trained; the message names the report).
        Whatever `ddcolor.data.ingest.ingest` and `train_step` raise.
    """
    from ddcolor.data.ingest import ingest
    from ddcolor.storage import join

    emit = on_summary or (lambda text: log.info("%s", text))
    dataset = join(out_dir, "data")
    emit(ingest(source, dataset, config, progress=progress).summary())
    emit(validate_step(config, dataset).summary())
    return train_step(
        config, dataset, out_dir=out_dir, init=init, resume=resume, track=track, run_name=run_name, progress=progress
    )


class _ProgressTracker:
    """A tracker that also reports training progress: ``on_progress(step, max_steps)`` at every log step (the
    trainer logs ``train/*`` metrics once per optimizer step); everything else goes to the wrapped tracker."""

    def __init__(self, tracker: Any, on_progress: Callable[[int, int], None], config: Config) -> None:
        self._tracker, self._on_progress = tracker, on_progress
        self._every, self._total = max(1, config.train.log_every), config.train.max_steps

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._tracker.log_metrics(metrics, step=step)
        if step is not None and "train/images_per_s" in metrics and (step % self._every == 0 or step >= self._total):
            try:
                self._on_progress(step, self._total)
            except Exception as err:  # progress display must never stop training
                log.warning("progress report failed at step %d: %s", step, err)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)


def torchrun_command(
    config_path: str | os.PathLike[str],
    dataset_uri: str,
    out_dir: str | os.PathLike[str],
    nproc_per_node: int,
    *,
    run_name: str | None = None,
    python: str = sys.executable,
    rendezvous: Rendezvous | None = None,
    result_json: str | os.PathLike[str] | None = None,
) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m ddcolor.cli train ...`` for one multi-GPU node; with a
    multi-node `ddcolor.launch.Rendezvous`, ``torchrun --nnodes M --node_rank R --rdzv_backend c10d
    --rdzv_endpoint HOST:PORT --rdzv_id ID ...`` (every node runs it with its own node rank).

    ``torchrun`` is the script installed next to `python` when present, else ``python -m torch.distributed.run``
    (the same program). ``result_json``: rank 0 writes the `TrainResult` there (``ddcolor train --result-json``).
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    script = Path(python).with_name("torchrun")
    launcher = [str(script)] if script.is_file() else [python, "-m", "torch.distributed.run"]
    cmd = [
        *launcher,
        *(rendezvous or Rendezvous()).torchrun_args(nproc_per_node),
        "-m",
        "ddcolor.cli",
        "train",
        "--config",
        str(config_path),
        "--data",
        dataset_uri,
        "--out",
        str(out_dir),
        "--no-progress",
    ]
    if result_json is not None:
        cmd += ["--result-json", str(result_json)]
    return [*cmd, "--run-name", run_name] if run_name else cmd


RESULT_JSON = "train_result.json"  # what `ddcolor train --result-json` writes in the torchrun path, in out_dir


def read_train_result(path: str | os.PathLike[str]) -> TrainResult:
    """The `TrainResult` that ``ddcolor train --result-json PATH`` wrote (the contract of the torchrun path).

    Raises:
        RuntimeError: no such file, or not a TrainResult (names the file).
    """
    from ddcolor.train import TrainResult

    try:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(TrainResult)}
        return TrainResult(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError) as err:
        raise RuntimeError(
            f"{path}: no readable training result ({err}); `ddcolor train --result-json` writes it at the end of a "
            "run on rank 0: check the training output above"
        ) from err


def train_distributed_step(
    config: Config,
    dataset_uri: str,
    *,
    out_dir: str | os.PathLike[str],
    nproc_per_node: int,
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    rendezvous: Rendezvous | None = None,
    on_line: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train with `torchrun_command` (DDP over `nproc_per_node` processes): the resolved config is written to
    ``out_dir/params.resolved.yaml``; the command's output goes line by line, as it comes, to ``on_line`` (default:
    this module's logger); rank 0's `TrainResult` is read from ``out_dir/train_result.json``
    (``ddcolor train --result-json``), then `tags` are set on its MLflow run.
    ``rendezvous``: this node's part of a multi-node run (the other nodes run the same command with their own node
    rank, e.g. the pods of infra/k8s/examples/train-multinode-job.yaml); None: one node.

    Raises:
        RuntimeError: the command failed (its exit code and the last output lines).
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "params.resolved.yaml"
    config_path.write_text(config.to_yaml())
    result_json = out / RESULT_JSON
    result_json.unlink(missing_ok=True)  # never read a previous run's result
    cmd = torchrun_command(
        config_path, dataset_uri, out, nproc_per_node, run_name=run_name, rendezvous=rendezvous, result_json=result_json
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=_tracking_uri(tracking_uri), PYTHONUNBUFFERED="1")
    log.info("train: %s", " ".join(cmd))
    emit = on_line or (lambda line: log.info("%s", line))
    tail: deque[str] = deque(maxlen=20)
    # one pipe for both streams, read as lines arrive (not buffered until exit): a watcher sees steps as they happen
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            emit(line)
    if proc.returncode != 0:
        lines = "\n".join(tail).strip()
        raise RuntimeError(f"distributed training exited with code {proc.returncode}:\n{lines}")
    result = read_train_result(result_json)
    if result.run_id and tags:
        client = _client(tracking_uri)
        for key, value in tags.items():
            client.set_tag(result.run_id, key, str(value))
    return result


def train_model_step(
    config: Config,
    dataset_uri: str,
    *,
    out_dir: str | os.PathLike[str],
    tracking_uri: str | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    progress: bool = True,
    nproc_per_node: int = 1,
    rendezvous: Rendezvous | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> TrainResult:
    """`train_step` in this process, or `train_distributed_step` (torchrun) for ``nproc_per_node > 1`` or a
    multi-node `rendezvous`. ``on_progress`` applies in this process, ``on_line`` to torchrun's output."""
    if nproc_per_node > 1 or (rendezvous is not None and not rendezvous.standalone):
        return train_distributed_step(
            config, dataset_uri, out_dir=out_dir, nproc_per_node=nproc_per_node, tracking_uri=tracking_uri,
            tags=tags, run_name=run_name, rendezvous=rendezvous, on_line=on_line,
        )  # fmt: skip
    return train_step(
        config, dataset_uri, out_dir=out_dir, tracking_uri=tracking_uri, tags=tags, run_name=run_name,
        progress=progress, on_progress=on_progress,
    )  # fmt: skip


def evaluate_network(
    config: Config,
    network: Any,
    dataset_uri: str,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    track: bool = True,
    run_name: str | None = None,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    random_metrics: bool = False,
    precision: str = "auto",
    progress: bool = True,
    metric_networks: dict[str, Any] | None = None,
) -> EvalResult:
    """`ddcolor.evaluate.evaluate` of `network` on the val split of `dataset_uri`, logged to MLflow: into the
    existing run `run_id` (so its ``val/*`` metrics sit on the run that trained the model), else into a new run
    `run_name`; ``track=False`` logs nothing. The run ends FINISHED, FAILED when evaluation raised, KILLED on Ctrl+C.

    ``random_metrics``: random-init Inception/AlexNet for FID/LPIPS, so their values are meaningless (the caller
    says so loudly). ``metric_networks``: networks already built (`ddcolor.comparison.metric_networks`), reused.

    Raises:
        ddcolor.tracking.TrackingError: MLflow cannot be used.
        ddcolor.weights.WeightsError: the metric networks' weights are not in the cache.
    """
    from ddcolor.evaluate import evaluate
    from ddcolor.tracking import start_tracker

    with start_tracker(config, enabled=track, run_name=run_name, run_id=run_id, tracking_uri=tracking_uri) as tracker:
        return evaluate(
            network, dataset_uri, config, pretrained=None if random_metrics else "cache", tracker=tracker,
            out_dir=out_dir, progress=progress, precision=precision, metric_networks=metric_networks,
        )  # fmt: skip


def evaluate_step(
    config: Config,
    dataset_uri: str,
    *,
    checkpoint_path: str | os.PathLike[str],
    run_id: str,
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate the trained generator on the val split, logging ``val/*`` metrics into the TRAINING run `run_id`
    (what the gates and the registry read).

    ``eval.metric_weights: random`` uses random-init Inception/AlexNet, with a loud warning: FID and LPIPS are then
    meaningless (offline demos and smoke tests only).

    Then, when there is a champion whose recorded evaluation is of other data (or other eval settings), the champion
    is evaluated on the same val split with the very same metric networks and the result cached on its version
    (`ddcolor.comparison.champion_on_same_data`), so that the gate compares like with like. A failure there is only
    logged: the gate then fails its champion checks with the reason.
    """
    from ddcolor.comparison import champion_on_same_data, metric_networks
    from ddcolor.model.checkpoint import load_model

    random_metrics = config.eval.metric_weights == "random"
    if random_metrics:
        log.warning(
            "eval.metric_weights=random: FID and LPIPS use RANDOM Inception/AlexNet networks; their values are "
            "MEANINGLESS (smoke tests and offline demos only). Fetch the metric weights (`ddcolor weights fetch "
            "pt_inception`, `... alexnet`) and set eval.metric_weights=cache for real numbers."
        )
    network = load_model(checkpoint_path)
    networks = metric_networks(config)  # one set for the challenger and the champion
    result = evaluate_network(
        config, network, dataset_uri, run_id=run_id, tracking_uri=tracking_uri, out_dir=out_dir,
        random_metrics=random_metrics, progress=progress, metric_networks=networks,
    )  # fmt: skip
    log.info("evaluate: %d images: %s", result.n_images, ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    identity = (result.protocol["dataset_manifest_sha256"], result.protocol["eval_config_sha256"])
    try:
        champion_on_same_data(
            config, identity, dataset_uri, tracking_uri=tracking_uri, networks=networks, progress=progress
        )
    except Exception as err:
        log.warning("could not evaluate the champion on this val split (the gate will say so): %s", err)
    return result


@dataclass(frozen=True)
class PromotionOutcome:
    """What `promote_step` decided: the gate decision, the registered version, whether it became champion, why."""

    decision: GateDecision
    version: str
    promoted: bool
    champion_version: str | None
    reason: str
    model_card: str | None = None  # Markdown (`ddcolor.model_card`), also on the version and the run
    pending_approval: bool = False  # gates passed, gates.require_approval: waits for `ddcolor.approval`


def promote_step(
    config: Config,
    run_id: str,
    *,
    fp: Fingerprint,
    tracking_uri: str | None = None,
    attach_onnx: bool | None = None,
) -> PromotionOutcome:
    """Gate the run's ``val/*`` metrics (thresholds + vs the champion measured on the same val split,
    ``data.shards_uri``), register its model (alias challenger, tagged
    with the fingerprint), and move the champion alias to it when the gate passed (with ``gates.require_approval``:
    the version waits as @challenger instead, ``pending_approval``; `ddcolor.approval` finishes it)."""
    from ddcolor.registry import gate_run, promote, register

    uri = _tracking_uri(tracking_uri)
    decision = gate_run(run_id, config, tracking_uri=uri, dataset_uri=config.data.shards_uri)
    version = register(run_id, None, config, tracking_uri=uri, attach_onnx=attach_onnx)
    client = _client(uri)
    for key, value in fp.as_tags().items():
        client.set_model_version_tag(config.registry.model_name, version, key, value)
    name, alias = config.registry.model_name, config.registry.champion_alias
    if decision.passed and config.gates.require_approval:
        from ddcolor.approval import hold_for_approval

        return hold_for_approval(config, version, decision, tracking_uri=uri)
    promotion = promote(version, decision, config, tracking_uri=uri)
    if promotion.promoted:
        reason = f"{name} v{version} is the new @{alias} (previous: {promotion.previous_champion or 'none'})"
    elif decision.passed:
        reason = f"{name} v{version} is already @{alias}"
    else:
        failed = "; ".join(c.reason for c in decision.checks if not c.passed)
        stays = f"@{alias} stays v{promotion.champion}" if promotion.champion else f"no @{alias} yet"
        reason = f"gate failed for {name} v{version} ({failed}); {stays}"
    log.info("promote: %s", reason)
    card = None
    try:
        from ddcolor.model_card import attach_model_card

        card = attach_model_card(config, version, tracking_uri=uri, decision=decision)
    except Exception as err:  # documentation must not undo a promotion
        log.warning("could not write the model card of %s v%s: %s", name, version, err)
    return PromotionOutcome(decision, version, promotion.promoted, promotion.champion, reason, card)


def promotion_record(
    config: Config, run_id: str, version: str, decision: GateDecision, promotion: Any
) -> tuple[dict[str, Any], str]:
    """The JSON record of one promotion (``ddcolor promote --out``, read by ``dvc metrics show``) and its line for
    people. ``promotion`` is `ddcolor.registry.promote`'s result (promoted, champion, previous_champion).

    ``decision``: ``promoted`` (the version is the new champion), ``already_champion`` (it passed and already was),
    ``rejected`` (the gate failed; the champion stays).
    """
    name, alias = config.registry.model_name, config.registry.champion_alias
    if promotion.promoted:
        outcome = "promoted"
        line = f"promoted {name} version {version} to @{alias} (previous: {promotion.previous_champion or 'none'})"
    elif decision.passed:
        outcome = "already_champion"
        line = f"{name} version {version} is already @{alias}"
    else:
        outcome = "rejected"
        line = f"{name} version {version} not promoted (gate failed); @{alias} stays {promotion.champion or 'unset'}"
    record = {
        "decision": outcome,
        "promoted": promotion.promoted,
        "gate_passed": decision.passed,
        "model_name": name,
        "version": version,
        "champion": promotion.champion,
        "previous_champion": promotion.previous_champion,
        "run_id": run_id,
        "checks": decision.to_dict()["checks"],
    }
    return record, line


def rollback_record(config: Config, rollback: Any) -> tuple[dict[str, Any], str]:
    """The JSON record of a rollback (``ddcolor promote --rollback --out``), in the format of `promotion_record`,
    and its line for people. ``rollback`` is `ddcolor.registry.rollback`'s result (version, champion,
    previous_champion)."""
    name, alias = config.registry.model_name, config.registry.champion_alias
    record = {
        "decision": "rolled_back",
        "promoted": True,
        "model_name": name,
        "version": rollback.version,
        "champion": rollback.champion,
        "previous_champion": rollback.previous_champion,
    }
    return record, f"rolled back {name}@{alias}: version {rollback.previous_champion} -> {rollback.champion}"


def colorize_step(
    config: Config,
    *,
    out_dir: str | os.PathLike[str],
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    input_size: int = 256,
) -> DemoResult:
    """Colorize the bundled sample photos with `model_uri` (default the champion, ``models:/NAME@ALIAS``) and write
    ``out_dir/{gray,color}/`` and ``out_dir/grid.png`` (gray input | colorized | original)."""
    from ddcolor.demo import run_demo
    from ddcolor.registry import load_registered_generator

    uri = _tracking_uri(tracking_uri)
    model_uri = model_uri or f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
    network = load_registered_generator(model_uri, tracking_uri=uri)
    result = run_demo(out_dir, model=network, label=model_uri, input_size=input_size)
    log.info("colorize: %s -> %s", model_uri, result.grid)
    return result


def log_grid(run_id: str, grid: str | os.PathLike[str], *, tracking_uri: str | None = None) -> str | None:
    """Log the grid PNG into the run (folder `GRID_ARTIFACT_DIR`); return its HTTP URL when MLflow is an HTTP server
    (what a Prefect image artifact needs), else None."""
    uri = _tracking_uri(tracking_uri)
    _client(uri).log_artifact(run_id, str(grid), GRID_ARTIFACT_DIR)
    if not tracking_client.is_http(uri):
        return None
    return f"{uri.rstrip('/')}/get-artifact?path={GRID_ARTIFACT_DIR}/{Path(grid).name}&run_uuid={run_id}"


def is_transient(err: BaseException) -> bool:
    """True for errors a retry can fix: S3 or MLflow unreachable, timeouts. Never for a failed validation, a bad
    config, a diverged training or a missing file (those fail the same way every time)."""
    from ddcolor.config import ConfigError
    from ddcolor.storage import StorageError, StorageNotFoundError
    from ddcolor.tracking import TrackingError
    from ddcolor.train import TrainingDivergedError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ValidationFailed | ConfigError | TrainingDivergedError | StorageNotFoundError):
            return False
        if isinstance(err, TrackingError) and "unreachable" in str(err):
            return True
        if isinstance(err, StorageError | ConnectionError | TimeoutError):
            return True
        if _is_requests_connection_error(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _is_requests_connection_error(err: BaseException) -> bool:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with mlflow
        return False
    return isinstance(err, requests.exceptions.ConnectionError | requests.exceptions.Timeout)


def section_overrides(**sections: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data={"size": 64}, train={"max_steps": 3}`` -> ``{"data.size": 64, "train.max_steps": 3}`` (for
    `ddcolor.config.load_config`); None sections are skipped."""
    overrides: dict[str, Any] = {}
    for section, values in sections.items():
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise TypeError(f"{section}: expected a mapping of {section}.* keys, got {type(values).__name__}")
        for key, value in values.items():
            overrides[f"{section}.{key}"] = value
    return overrides


# --- the step implementations run_pipeline calls ---------------------------------------------------------------


def validate_report_step(config: Config, *, report_dir: str | None = None) -> str | None:
    """`validate_step` on ``data.shards_uri``; the Markdown report's URI. Raises `ValidationFailed`."""
    result = validate_step(config, report_dir=report_dir)
    return next((u for u in result.report_uris if u.endswith(".md")), None)


def evaluate_metrics_step(config: Config, dataset_uri: str, **kwargs: Any) -> dict[str, float]:
    """`evaluate_step` (same keywords); its metrics plus ``n_images``."""
    result = evaluate_step(config, dataset_uri, **kwargs)
    return {**result.metrics, "n_images": result.n_images}


def colorize_grid_step(
    config: Config, *, out_dir: str | os.PathLike[str], run_id: str | None, tracking_uri: str | None = None
) -> tuple[str, str | None]:
    """`colorize_step` with the champion, its grid logged into `run_id` (when there is one): (local grid path, the
    grid's HTTP URL on the MLflow server or None)."""
    grid = str(colorize_step(config, out_dir=out_dir, tracking_uri=tracking_uri).grid)
    return grid, log_grid(run_id, grid, tracking_uri=tracking_uri) if run_id else None


@dataclass(frozen=True)
class Steps:
    """The step implementations `run_pipeline` calls, in its order. The defaults are this module's functions (run
    in this process); the Prefect flow passes task-wrapped ones with the same signatures and results. Each
    callable's contract is that of its default:

    * ``ingest(config, source, *, progress)`` -> anything (`ingest_step`)
    * ``validate(config, *, report_dir)`` -> the report URI; raises `ValidationFailed` (`validate_report_step`)
    * ``fingerprint(config, tracking_uri)`` -> (dataset dict, `Fingerprint`, champion or None) (`fingerprint_step`)
    * ``name(config, fp)`` -> the run name: MLflow run and output folder (`run_name`)
    * ``train(config, dataset_uri, *, out_dir, tracking_uri, tags, run_name, progress, nproc_per_node, rendezvous)``
      -> `TrainResult` (`train_model_step`)
    * ``evaluate(config, dataset_uri, *, checkpoint_path, run_id, tracking_uri, out_dir, progress)`` -> metrics
      with ``n_images`` (`evaluate_metrics_step`)
    * ``promote(config, run_id, *, fp, tracking_uri, attach_onnx)`` -> `PromotionOutcome` (`promote_step`)
    * ``colorize(config, *, out_dir, run_id, tracking_uri)`` -> (grid path, grid URL or None) (`colorize_grid_step`)
    """

    ingest: Callable[..., Any] = ingest_step
    validate: Callable[..., str | None] = validate_report_step
    fingerprint: Callable[..., tuple[dict[str, Any], Fingerprint, ChampionInfo | None]] = fingerprint_step
    name: Callable[[Config, Fingerprint], str] = run_name
    train: Callable[..., TrainResult] = train_model_step
    evaluate: Callable[..., dict[str, float]] = evaluate_metrics_step
    promote: Callable[..., PromotionOutcome] = promote_step
    colorize: Callable[..., tuple[str, str | None]] = colorize_grid_step


# --- the whole pipeline ----------------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    """What one pipeline run did (JSON-ready with `to_dict`; human-ready with `to_markdown` / `summary`).

    Attributes:
        status: ``promoted`` | ``not_promoted`` | ``skipped`` | ``validation_failed``.
        reason: one line saying why.
        dataset: the `DatasetVersion` as a dict (uri, manifest_sha256, dvc_md5, rows), None before ingest.
        fingerprint: the `Fingerprint` value (None when validation failed first).
        run_id, run_url: the MLflow training run (None when skipped); the UI address for an HTTP server.
        tracking_uri: where the run and the registry are.
        metrics: the eval metrics of the run.
        decision: `GateDecision.to_dict()`; gate_table its Markdown table (metrics vs thresholds vs champion).
        model_version: the version registered by this run; champion_version the champion afterwards.
        validation_report: the validation report (Markdown) URI.
        grid: the sample grid PNG colorized by the champion (None when colorizing was off or there is no champion).
        grid_url: its HTTP URL on the MLflow server, when there is one.
        seconds: wall time per step, s.
    """

    status: Status
    reason: str
    dataset: dict[str, Any] | None = None
    fingerprint: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    tracking_uri: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    gate_table: str | None = None
    model_version: str | None = None
    champion_version: str | None = None
    validation_report: str | None = None
    grid: str | None = None
    grid_url: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def status_message(self) -> str:
        """One line that starts with the status in words: ``promoted: ...``, ``not promoted: ...``, ``skipped: ...``."""
        prefix = self.status.replace("_", " ")
        return self.reason if self.reason.startswith(prefix) else f"{prefix}: {self.reason}"

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"pipeline: {self.status.upper()}: {self.reason}"]
        if self.dataset:
            lines.append(
                f"dataset: {self.dataset.get('uri')} ({self.dataset.get('rows')} rows, manifest "
                f"{str(self.dataset.get('manifest_sha256'))[:12]})"
            )
        if self.fingerprint:
            lines.append(f"fingerprint: {self.fingerprint[:12]}")
        if self.metrics:
            lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()))
        if self.run_id:
            lines.append(f"MLflow run: {self.run_url or self.run_id} ({self.tracking_uri})")
        if self.model_version:
            lines.append(f"model version: {self.model_version} (champion: {self.champion_version or 'none'})")
        if self.validation_report:
            lines.append(f"validation report: {self.validation_report}")
        if self.grid:
            lines.append(f"sample grid (champion): {self.grid}")
        if self.seconds:
            lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The run summary for people: decision, dataset version, metrics vs thresholds vs champion, links."""
        out = [f"# train-ddcolor: {self.status.replace('_', ' ')}", "", f"**{self.reason}**", ""]
        if self.dataset:
            d = self.dataset
            out += [
                "| dataset | |",
                "|---|---|",
                f"| uri | `{d.get('uri')}` |",
                f"| rows | {d.get('rows')} |",
                f"| manifest sha256 | `{d.get('manifest_sha256')}` |",
                f"| DVC md5 | `{d.get('dvc_md5') or '-'}` |",
                f"| fingerprint (data + config) | `{self.fingerprint or '-'}` |",
                "",
            ]
        if self.run_id:
            where = f"[{self.run_id}]({self.run_url})" if self.run_url else f"`{self.run_id}`"
            out += [f"MLflow run: {where} on `{self.tracking_uri}`", ""]
        if self.gate_table:
            out += ["## Gates (metrics vs thresholds vs champion)", "", self.gate_table, ""]
        if self.metrics:
            out += ["## Eval metrics", "", "| metric | value |", "|---|---|"]
            out += [f"| {k} | {v:.4g} |" for k, v in self.metrics.items()]
            out.append("")
        if self.model_version or self.champion_version:
            out += [f"Model version: {self.model_version or '-'}; champion: {self.champion_version or 'none'}", ""]
        if self.validation_report:
            out += [f"Validation report: `{self.validation_report}`", ""]
        if self.grid:
            link = f" ([image]({self.grid_url}))" if self.grid_url else ""
            out += [f"Sample grid (champion): `{self.grid}`{link}", ""]
        if self.seconds:
            out += ["Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()), ""]
        return "\n".join(out)


def run_pipeline(
    config: Config,
    source: str | None = None,
    *,
    work_dir: str | os.PathLike[str],
    force: bool = False,
    progress: bool = True,
    tracking_uri: str | None = None,
    colorize: bool = True,
    run_tags: Mapping[str, Any] | None = None,
    nproc_per_node: int = 1,
    rendezvous: Rendezvous | None = None,
    attach_onnx: bool | None = None,
    steps: Steps | None = None,
) -> PipelineResult:
    """The pipeline's one control flow: ingest -> validate -> fingerprint (skip?) -> train -> evaluate -> gate and
    promote -> colorize, each step through `steps` (default: in this process; the Prefect flow passes tasks).

    Args:
        config: the whole configuration; the dataset is ``data.shards_uri``.
        source: raw images (folder or ``s3://``); default ``data.source``.
        work_dir: local folder for this pipeline's outputs: ``validation/`` (reports), ``runs/<run name>/``
            (training output, ``eval/``; the name is ``steps.name``, e.g. ``train-atto-20260101-120000-1a2b3c4d``,
            also the MLflow run's name), ``samples/`` (the champion's sample grid).
        force: train even when the champion has the same fingerprint.
        progress: progress bars for ingest, training and evaluation.
        tracking_uri: MLflow tracking URI; None = ``MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``).
        colorize: colorize the sample photos with the champion at the end, whenever there is one (also when skipped
            or not promoted).
        run_tags: extra tags for the MLflow training run.
        nproc_per_node, rendezvous: > 1 process or a multi-node `ddcolor.launch.Rendezvous` trains with ``torchrun``.
        attach_onnx: export an ONNX copy of each registered version (see `ddcolor.registry.register`); None =
            ``config.registry.export_onnx``.
        steps: the step implementations (`Steps`); None = `Steps()`.

    Returns:
        The `PipelineResult`; a failed validation is ``status="validation_failed"`` (no exception).
    """
    steps = steps or Steps()
    uri = _tracking_uri(tracking_uri)
    work = Path(work_dir)
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        start = time.monotonic()
        log.info("pipeline step %s ...", name)
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[name] = round(time.monotonic() - start, 2)

    timed("ingest", steps.ingest, config, source, progress=progress)
    try:
        report = timed("validate", steps.validate, config, report_dir=str(work / "validation"))
    except ValidationFailed as err:
        return PipelineResult(
            "validation_failed", str(err), tracking_uri=uri, validation_report=err.report_uri, seconds=seconds
        )
    dataset, fp, champion = timed("fingerprint", steps.fingerprint, config, uri)
    skip, why = should_skip(fp, champion, force=force)
    result = PipelineResult(
        "skipped",
        why,
        dataset=dataset,
        fingerprint=fp.value,
        tracking_uri=uri,
        validation_report=report,
        champion_version=champion.version if champion else None,
    )
    log.info("%s: %s", "skipping training" if skip else "training", why)
    if not skip:
        name = steps.name(config, fp)
        out_dir = work / "runs" / name
        trained = timed(
            "train",
            steps.train,
            config,
            config.data.shards_uri,
            out_dir=str(out_dir),
            tracking_uri=uri,
            tags={**fp.as_tags(), **(run_tags or {})},
            run_name=name,
            progress=progress,
            nproc_per_node=nproc_per_node,
            rendezvous=rendezvous,
        )
        if trained.run_id is None:
            raise RuntimeError("training logged no MLflow run; the pipeline needs one to gate and register the model")
        result.run_id, result.run_url = trained.run_id, run_url(trained.run_id, tracking_uri=uri)
        result.metrics = timed(
            "evaluate",
            steps.evaluate,
            config,
            config.data.shards_uri,
            checkpoint_path=trained.checkpoint_path,
            run_id=trained.run_id,
            tracking_uri=uri,
            out_dir=str(out_dir / "eval"),
            progress=progress,
        )
        outcome = timed(
            "promote", steps.promote, config, trained.run_id, fp=fp, tracking_uri=uri, attach_onnx=attach_onnx
        )
        result.status = "promoted" if outcome.promoted else "not_promoted"
        result.reason = outcome.reason
        result.decision, result.gate_table = outcome.decision.to_dict(), outcome.decision.table()
        result.model_version, result.champion_version = outcome.version, outcome.champion_version
    if colorize and result.champion_version:
        result.grid, result.grid_url = timed(
            "colorize", steps.colorize, config, out_dir=str(work / "samples"), run_id=result.run_id, tracking_uri=uri
        )
    result.seconds = seconds
    return result
