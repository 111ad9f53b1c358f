"""MLflow model registry: register a run's model, gate it, promote it to ``champion``, roll back.

Aliases (MLflow 3; stages are not used): ``registry.challenger_alias`` points at the last registered version,
``registry.champion_alias`` at the serving one (``models:/ddcolor@champion``). Usage::

    version = register(run_id, None, cfg)                 # model URI from the run's ``ddcolor.model_uri`` tag
    decision = gate_run(run_id, cfg)                      # run's val/* metrics vs gates and champion; logged to run
    promote(version, decision, cfg)                       # moves champion only when decision.passed
    rollback(cfg)                                         # champion -> its ``previous_champion``

Tags written on a model version:

* ``lineage.run_id``, ``lineage.model_uri``, ``git.commit`` / ``git.dirty`` (from the run), every ``dataset.*`` run
  tag, and ``metric.<name>`` for each ``val/<name>`` run metric (what `champion_metrics` reads back);
* ``onnx_artifact``: ``runs:/<run_id>/onnx/generator.onnx``, the generator exported to ONNX and logged on the run
  (``registry.export_onnx: false`` in the config, or ``register(..., attach_onnx=False)``, skips it);
* on promotion: ``blessing`` (the gate decision as JSON; also written when the gate failed) and
  ``previous_champion`` (the version that was champion before, absent for the first champion).

Concurrency: `promote` and `rollback` hold the registry-wide promotion lock (`ddcolor.registry_lock`) while they
read and move the champion alias: a lease renewed by a heartbeat thread, whose takeover after expiry is an atomic
create of the next *generation* (a registered model ``<model_name>.promotion-lock.<N>``; exactly one racer creates
it), and whose generation number is a fencing token re-checked immediately before the alias moves. Guarantee: with
an SQL-backed tracking server or store (SQLite, PostgreSQL, MySQL), concurrent promotions from any number of
processes or hosts are serialized however long each one takes, so the champion alias always ends on a version whose
gate passed and each ``previous_champion`` tag names the champion it really replaced. A holder that stalls past the
TTL (120 s without a heartbeat: crashed, frozen, cut off) is taken over, and when it wakes up its fencing check fails:
it aborts without moving the alias (`RegistryError`). The one timing assumption left is that the single alias-move
request after a passed check completes within the TTL, with host clocks within a third of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddcolor import registry_lock
from ddcolor.errors import DDColorError
from ddcolor.gates import GateDecision, decide
from ddcolor.tracking import client as tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ddcolor.config import Config

__all__ = [
    "CONFIG_SHA_TAG",
    "DATASET_SHA_TAG",
    "FINGERPRINT_TAG",
    "ChampionInfo",
    "Promotion",
    "RegistryError",
    "champion_info",
    "champion_metrics",
    "champion_version",
    "gate_run",
    "promote",
    "register",
    "rollback",
    "run_metrics",
    "version_metrics",
]

log = logging.getLogger(__name__)

MODEL_URI_TAG = "ddcolor.model_uri"
METRIC_TAG_PREFIX = "metric."
ONNX_TAG = "onnx_artifact"
BLESSING_TAG = "blessing"
PREVIOUS_TAG = "previous_champion"
LOCK_SUFFIX = registry_lock.LOCK_SUFFIX
#: Version tags the pipeline writes (`ddcolor.pipeline.Fingerprint.as_tags`) and `champion_info` reads back.
FINGERPRINT_TAG = "pipeline.fingerprint"
DATASET_SHA_TAG = "pipeline.dataset_sha256"
CONFIG_SHA_TAG = "pipeline.config_sha256"


class RegistryError(DDColorError, RuntimeError):
    """A registry operation cannot be done (no champion, no previous champion, lock not acquired, ...)."""


@dataclass(frozen=True)
class Promotion:
    """What `promote` / `rollback` did: ``champion`` is the champion version afterwards (None if there is none)."""

    version: str
    promoted: bool
    champion: str | None
    previous_champion: str | None


@dataclass(frozen=True)
class ChampionInfo:
    """The current champion version and the pipeline tags it was registered with (None when absent)."""

    version: str
    fingerprint: str | None
    dataset_sha256: str | None
    config_sha256: str | None
    run_id: str | None


def _client(tracking_uri: str | None = None) -> MlflowClient:
    return tracking_client.client(tracking_uri)


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The model version behind `alias`, or None when the alias (or the registered model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if tracking_client.is_not_found(err):
            return None
        raise


def run_metrics(run_id: str, *, tracking_uri: str | None = None) -> dict[str, float]:
    """The run's ``val/<name>`` metrics (latest values) as ``{name: value}``."""
    run = _client(tracking_uri).get_run(run_id)
    return {k.removeprefix("val/"): float(v) for k, v in run.data.metrics.items() if k.startswith("val/")}


def register(
    run_id: str,
    model_uri: str | None,
    config: Config,
    *,
    metrics: Mapping[str, float] | None = None,
    tracking_uri: str | None = None,
    attach_onnx: bool | None = None,
) -> str:
    """Register the run's model as a new version of ``config.registry.model_name`` and point the challenger at it.

    Args:
        run_id: the training (or evaluation) run that logged the model.
        model_uri: ``models:/m-...`` (or ``runs:/...``); None reads the run's ``ddcolor.model_uri`` tag.
        config: names of the registered model and aliases.
        metrics: the eval metrics to record as ``metric.*`` tags; None = the run's ``val/*`` metrics.
        attach_onnx: export the generator to ONNX (`ddcolor.export.export_onnx`), log it as the run artifact
            ``onnx/generator.onnx`` and tag the version ``onnx_artifact=runs:/<run_id>/onnx/generator.onnx``;
            None = ``config.registry.export_onnx`` (default true; tens of seconds of CPU per version).

    Returns:
        The new version number, as a string.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    name = config.registry.model_name
    run = client.get_run(run_id)
    tags = run.data.tags
    model_uri = model_uri or tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise RegistryError(f"run {run_id} has no {MODEL_URI_TAG!r} tag; pass the model URI (models:/m-...)")
    try:
        client.create_registered_model(name, description="DDColor image colorization generator.")
    except MlflowException as err:
        if "ALREADY_EXISTS" not in tracking_client.error_code(err):
            raise
    if metrics is None:
        metrics = {k.removeprefix("val/"): v for k, v in run.data.metrics.items() if k.startswith("val/")}
    lineage = {"lineage.run_id": run_id, "lineage.model_uri": model_uri}
    for key in ("git.commit", "git.dirty", "git.branch"):
        if key in tags:
            lineage[key] = tags[key]
    if "git.commit" not in lineage and "mlflow.source.git.commit" in tags:
        lineage["git.commit"] = tags["mlflow.source.git.commit"]
    lineage.update({k: v for k, v in tags.items() if k.startswith(("dataset.", "eval."))})
    lineage.update({f"{METRIC_TAG_PREFIX}{k.removeprefix('val/')}": repr(float(v)) for k, v in metrics.items()})
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    # A SQL store's create_model_version looks the logged model up through MLflow's process-wide URI, not the client's
    with tracking_client.use_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags=lineage, model_id=model_id, await_creation_for=60
        )
    if config.registry.export_onnx if attach_onnx is None else attach_onnx:
        onnx_uri = _attach_onnx(client, run_id, model_uri, tracking_uri)
        client.set_model_version_tag(name, mv.version, ONNX_TAG, onnx_uri)
    client.set_registered_model_alias(name, config.registry.challenger_alias, mv.version)
    log.info(
        "registered %s version %s from run %s (alias %s)", name, mv.version, run_id, config.registry.challenger_alias
    )
    return str(mv.version)


def _attach_onnx(client: MlflowClient, run_id: str, model_uri: str, tracking_uri: str | None) -> str:
    """Export the generator behind `model_uri` to ONNX, log it as run artifact ``onnx/generator.onnx``; its URI."""
    import tempfile
    from pathlib import Path

    from ddcolor.export import export_onnx

    model = load_registered_generator(model_uri, tracking_uri=tracking_uri or client.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ddcolor-onnx-") as tmp:
        path = export_onnx(model, Path(tmp) / "generator.onnx")
        client.log_artifact(run_id, str(path), "onnx")
    return f"runs:/{run_id}/onnx/{path.name}"


def version_metrics(mv: Any) -> dict[str, float]:
    """The ``metric.*`` tags of a model version as ``{name: value}`` (unparsable values left out)."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                out[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
            except ValueError:
                continue
    return out


def champion_metrics(config: Config, *, tracking_uri: str | None = None) -> tuple[str, dict[str, float]] | None:
    """``(version, {metric: value})`` of the current champion (from its ``metric.*`` tags), or None if none."""
    mv = _alias_version(_client(tracking_uri), config.registry.model_name, config.registry.champion_alias)
    if mv is None:
        return None
    return str(mv.version), version_metrics(mv)


def champion_version(config: Config, *, tracking_uri: str | None = None) -> Any | None:
    """The champion's MLflow ``ModelVersion`` (tags included), or None when there is no champion."""
    return _alias_version(_client(tracking_uri), config.registry.model_name, config.registry.champion_alias)


def champion_info(config: Config, *, tracking_uri: str | None = None) -> ChampionInfo | None:
    """The champion of ``registry.model_name`` (alias ``registry.champion_alias``) with its pipeline tags, or None
    when there is none."""
    mv = _alias_version(_client(tracking_uri), config.registry.model_name, config.registry.champion_alias)
    if mv is None:
        return None
    tags = mv.tags or {}
    return ChampionInfo(
        str(mv.version), tags.get(FINGERPRINT_TAG), tags.get(DATASET_SHA_TAG), tags.get(CONFIG_SHA_TAG), mv.run_id
    )


def gate_run(
    run_id: str,
    config: Config,
    *,
    metrics: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    log_to_run: bool = True,
    dataset_uri: str | None = None,
) -> GateDecision:
    """Decide the gates for a run (its ``val/*`` metrics, or `metrics`) against the current champion measured on the
    same val split (`ddcolor.comparison.compare_with_champion`: recorded, cached, or evaluated now on `dataset_uri`,
    default the run's ``eval.dataset_uri`` tag), per-image metrics paired on the same images.

    With `log_to_run`, the run gets tags ``gate.passed`` (``true``/``false``) and ``gate.checks`` (JSON of the
    decision) and a ``gate.md`` artifact (the Markdown table).
    """
    from ddcolor.comparison import compare_with_champion

    client = _client(tracking_uri)
    if metrics is None:
        metrics = run_metrics(run_id, tracking_uri=tracking_uri)
    cmp = compare_with_champion(run_id, config, metrics=metrics, dataset_uri=dataset_uri, tracking_uri=tracking_uri)
    decision = decide(
        metrics,
        config.gates,
        None if cmp.champion_version is None else (cmp.champion.metrics if cmp.champion else {}),
        champion_version=cmp.champion_version,
        paired=cmp.paired,
        dataset_sha256=cmp.challenger.dataset_sha256,
        eval_config_sha256=cmp.challenger.eval_config_sha256,
        comparison=cmp.describe(),
        comparison_problem=cmp.problem,
    )
    if log_to_run:
        client.set_tag(run_id, "gate.passed", "true" if decision.passed else "false")
        client.set_tag(run_id, "gate.checks", decision.to_json())
        client.log_text(run_id, decision.table(), "gate.md")
    return decision


@contextmanager
def promotion_lock(
    config: Config,
    *,
    tracking_uri: str | None = None,
    timeout_s: float = 60.0,
    lock_ttl_s: float = 120.0,
    poll_s: float = 0.2,
) -> Iterator[registry_lock.PromotionLease]:
    """Hold the registry-wide promotion lock (`ddcolor.registry_lock`: a lease renewed by a heartbeat, with a
    fencing token); yields the lease. Call ``lease.check()`` immediately before moving an alias.

    Raises:
        RegistryError: not acquired within `timeout_s`, or the lease was lost while held (nothing was moved).
    """
    try:
        with registry_lock.promotion_lock(
            _client(tracking_uri), config.registry.model_name, timeout_s=timeout_s, ttl_s=lock_ttl_s, poll_s=poll_s
        ) as lease:
            yield lease
    except registry_lock.LockTimeoutError as err:
        raise RegistryError(str(err)) from None
    except registry_lock.LockLostError as err:
        raise RegistryError(f"{err}; the champion alias was not moved by this promotion, rerun it") from None


def promote(
    version: str | int,
    decision: GateDecision,
    config: Config,
    *,
    tracking_uri: str | None = None,
    lock_timeout_s: float = 60.0,
) -> Promotion:
    """Move the champion alias to `version` when `decision` passed; never when it failed.

    The decision is recorded on the version as the ``blessing`` tag either way. On promotion the version also gets
    ``previous_champion`` (the champion it replaces; no tag for the first champion). Promoting the current champion
    again changes nothing. Runs under `promotion_lock`.
    """
    client = _client(tracking_uri)
    name, alias = config.registry.model_name, config.registry.champion_alias
    version = str(version)
    client.get_model_version(name, version)  # fails early for an unknown version
    if not decision.passed:
        client.set_model_version_tag(name, version, BLESSING_TAG, decision.to_json())
        current = _alias_version(client, name, alias)
        log.info("gate failed: %s version %s not promoted", name, version)
        return Promotion(version, False, str(current.version) if current else None, None)
    with promotion_lock(config, tracking_uri=tracking_uri, timeout_s=lock_timeout_s) as lease:
        current = _alias_version(client, name, alias)
        previous = str(current.version) if current else None
        if previous == version:
            return Promotion(version, False, version, client.get_model_version(name, version).tags.get(PREVIOUS_TAG))
        client.set_model_version_tag(name, version, BLESSING_TAG, decision.to_json())
        if previous is not None:
            client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
        try:
            lease.check()  # fencing: still ours, right before the move
        except registry_lock.LockLostError:
            if previous is not None:  # the champion we read may be stale: do not leave a wrong chain behind
                with suppress(Exception):
                    client.delete_model_version_tag(name, version, PREVIOUS_TAG)
            raise
        client.set_registered_model_alias(name, alias, version)
    log.info("promoted %s version %s to %s (previous: %s)", name, version, alias, previous)
    return Promotion(version, True, version, previous)


def rollback(config: Config, *, tracking_uri: str | None = None, lock_timeout_s: float = 60.0) -> Promotion:
    """Move the champion alias back to the version named by the current champion's ``previous_champion`` tag.

    The version rolled back from gets the tag ``rolled_back`` (``true``). Returns a `Promotion` whose ``version`` is
    the new champion and ``previous_champion`` the one rolled back from.

    Raises:
        RegistryError: there is no champion, or it has no ``previous_champion``.
    """
    client = _client(tracking_uri)
    name, alias = config.registry.model_name, config.registry.champion_alias
    with promotion_lock(config, tracking_uri=tracking_uri, timeout_s=lock_timeout_s) as lease:
        current = _alias_version(client, name, alias)
        if current is None:
            raise RegistryError(f"registered model {name!r} has no {alias!r} alias to roll back")
        target = (current.tags or {}).get(PREVIOUS_TAG)
        if not target:
            raise RegistryError(
                f"{name} version {current.version} ({alias}) has no {PREVIOUS_TAG!r} tag: nothing to roll back to"
            )
        client.get_model_version(name, target)
        lease.check()  # fencing: still ours, right before the move
        client.set_model_version_tag(name, str(current.version), "rolled_back", "true")
        client.set_registered_model_alias(name, alias, target)
    log.info("rolled back %s %s: version %s -> %s", name, alias, current.version, target)
    return Promotion(str(target), True, str(target), str(current.version))


def blessing(mv_tags: Mapping[str, str]) -> GateDecision | None:
    """The gate decision recorded on a model version (its tags), or None."""
    raw = mv_tags.get(BLESSING_TAG)
    return GateDecision.from_dict(json.loads(raw)) if raw else None


def load_registered_generator(model_uri: str, *, tracking_uri: str | None = None):
    """Load the generator behind an MLflow model URI (``models:/ddcolor@champion``, ``models:/ddcolor/3``,
    ``models:/m-...``) as a `DDColor` in eval mode, from the safetensors checkpoint logged with it.

    Raises:
        FileNotFoundError: the URI cannot be resolved (no such model, version or alias; server unreachable).
        ddcolor.model.CheckpointError: the model holds no ddcolor checkpoint.
    """
    import tempfile
    from pathlib import Path

    import mlflow
    from mlflow.exceptions import MlflowException

    from ddcolor.model.checkpoint import CheckpointError, load_checkpoint

    tracking_uri = tracking_client.tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ddcolor-model-") as target:
        try:
            # Resolve the registry reference with an explicit client: no process-wide MLflow URI is changed.
            artifact_uri = _model_artifact_location(_client(tracking_uri), model_uri)
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=artifact_uri, dst_path=target, tracking_uri=tracking_uri
                )
            )
        except MlflowException as err:
            raise FileNotFoundError(
                f"cannot load {model_uri!r} from MLflow at {tracking_uri} ({err}); check MLFLOW_TRACKING_URI and the "
                "model name/alias (`ddcolor promote` sets the champion alias)"
            ) from err
        checkpoints = sorted(local.rglob("*.safetensors"))
        if not checkpoints:
            raise CheckpointError(f"{model_uri!r} holds no .safetensors checkpoint (not a ddcolor generator?)")
        log.info("loading %s from %s", model_uri, checkpoints[0])
        return load_checkpoint(checkpoints[0]).eval()


def _model_artifact_location(client: MlflowClient, model_uri: str) -> str:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/m-ID`` -> the logged model's artifact location."""
    ref = model_uri.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, number = ref.split("/", 1)
        version = client.get_model_version(name, number)
    else:
        return client.get_logged_model(ref).artifact_location
    if getattr(version, "model_id", None):
        return client.get_logged_model(version.model_id).artifact_location
    # some servers return no model_id but source="models:/m-<id>": resolve it through *this* client, not through
    # MLflow's process-wide tracking URI (which may point at another store)
    if version.source.startswith("models:/m-"):
        return client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    return version.source
