"""Same-data comparison with the champion: both models measured on the same val split before a gate compares them.

An evaluation is identified by the dataset it read (``eval.dataset_sha256``: the sha256 of the shard manifest, which
names every shard by its sha256) and by the evaluation settings (``eval.config_sha256``:
`ddcolor.evaluate.eval_config_sha256`, which covers the ``eval`` section and whether the metric networks were real or
random). `ddcolor.evaluate.evaluate` writes both as run tags and the per-image values as ``eval/per_image.json``;
`ddcolor.registry.register` copies the tags onto the model version.

At gate time (`compare_with_champion`), the champion's numbers on the challenger's identity come from, in order:

1. its own recorded evaluation, when that identity matches (``recorded``);
2. a cache on its model version: tag ``eval_cache.<dataset sha16>-<eval config sha16>`` (metrics as JSON) and the
   per-image values as artifact ``eval_cache/<key>/per_image.json`` of its run (``cached``);
3. otherwise it is evaluated now, on the challenger's val split, with the same evaluation settings and metric
   networks (`champion_on_same_data`; the pipeline does this right after the challenger's evaluation, passing the
   very same network objects), and the result is cached as in 2, so each dataset version costs one evaluation.

When none is possible (no dataset to evaluate on, the champion cannot be loaded), the ``*_vs_champion`` checks fail
with the reason; stale numbers are never compared. The per-image metrics are then paired (`ddcolor.stats`).

Usage::

    comparison = compare_with_champion(run_id, cfg, dataset_uri="data/shards")
    comparison.champion_metrics, comparison.paired, comparison.describe()
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddcolor.stats import PairedDelta, paired_deltas
from ddcolor.tracking import client as tracking_client

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from torch import nn

    from ddcolor.config import Config

__all__ = [
    "CACHE_TAG_PREFIX",
    "Comparison",
    "EvalRecord",
    "cache_key",
    "champion_on_same_data",
    "compare_with_champion",
    "metric_networks",
    "metric_weights",
    "run_record",
]

log = logging.getLogger(__name__)

CACHE_TAG_PREFIX = "eval_cache."
CACHE_ARTIFACT_DIR = "eval_cache"
DATASET_TAG, CONFIG_TAG, URI_TAG = "eval.dataset_sha256", "eval.config_sha256", "eval.dataset_uri"
PER_IMAGE_ARTIFACT = "eval/per_image.json"


@dataclass
class EvalRecord:
    """One model's evaluation: metrics (with ``n_images``), per-image values (None when not available), identity.

    Attributes:
        source: ``recorded`` | ``cached`` | ``evaluated in this process``.
    """

    metrics: dict[str, float]
    dataset_sha256: str | None
    eval_config_sha256: str | None
    per_image: dict[str, list[float]] | None = None
    source: str = "recorded"

    @property
    def identity(self) -> tuple[str | None, str | None]:
        return self.dataset_sha256, self.eval_config_sha256


@dataclass
class Comparison:
    """What the gate compares against.

    Attributes:
        champion_version: None when there is no champion.
        champion: the champion's record on the challenger's identity; None when there is no champion or it could
            not be measured on the same data (then `problem` says why).
        paired: per-image paired deltas (challenger − champion).
    """

    champion_version: str | None
    challenger: EvalRecord
    champion: EvalRecord | None = None
    paired: dict[str, PairedDelta] = field(default_factory=dict)
    problem: str | None = None

    def describe(self) -> str:
        """One line for the gate table and the model card."""
        dataset, config = self.challenger.identity
        where = f"dataset {dataset[:12] if dataset else '(unknown)'}, eval config {config[:12] if config else '?'}"
        n = self.challenger.metrics.get("n_images")
        where += f", {n:.0f} val images" if n is not None else ""
        if self.champion_version is None:
            return f"{where}; no champion"
        if self.champion is None:
            return f"{where}; champion v{self.champion_version} NOT comparable: {self.problem}"
        pairs = f"; paired on the same images: {', '.join(self.paired)}" if self.paired else ""
        return f"{where}; both models (champion v{self.champion_version}: {self.champion.source}){pairs}"


def cache_key(dataset_sha256: str, eval_config_sha256: str) -> str:
    """``<dataset sha16>-<eval config sha16>``: the champion cache tag suffix."""
    return f"{dataset_sha256[:16]}-{eval_config_sha256[:16]}"


def metric_weights(config: Config) -> str | None:
    """``evaluate``'s ``pretrained`` argument for ``eval.metric_weights``: ``"cache"`` or None (random)."""
    return None if config.eval.metric_weights == "random" else "cache"


def metric_networks(config: Config) -> dict[str, nn.Module]:
    """The FID Inception and LPIPS networks ``config.eval`` asks for, built once (shared by two evaluations)."""
    from ddcolor import metrics as M

    wanted, pretrained = set(config.eval.metrics), metric_weights(config)
    nets: dict[str, nn.Module] = {}
    if "fid" in wanted:
        nets["inception"] = M.build_fid_inception(pretrained)
    if "lpips" in wanted:
        nets["lpips"] = M.build_lpips(pretrained)
    return nets


def _download_json(client: MlflowClient, run_id: str, path: str) -> dict[str, Any] | None:
    """A JSON run artifact, or None when the run has none at `path`."""
    folder = path.rpartition("/")[0]
    try:
        if path not in {a.path for a in client.list_artifacts(run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory(prefix="ddcolor-cmp-") as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
    except Exception as err:  # an unreadable artifact only costs the pairing, never the gate
        log.warning("cannot read %s of run %s: %s", path, run_id, err)
        return None


def _per_image(data: Mapping[str, Any] | None) -> dict[str, list[float]] | None:
    return dict(data["metrics"]) if data and isinstance(data.get("metrics"), dict) else None


def run_record(run_id: str, *, metrics: Mapping[str, Any] | None = None, tracking_uri: str | None = None) -> EvalRecord:
    """The evaluation recorded on a run: its ``val/*`` metrics (or `metrics`), ``eval.*`` tags, per-image values."""
    client = tracking_client.client(tracking_uri)
    run = client.get_run(run_id)
    if metrics is None:
        metrics = {k.removeprefix("val/"): v for k, v in run.data.metrics.items() if k.startswith("val/")}
    tags = run.data.tags
    return EvalRecord(
        metrics={k.removeprefix("val/"): float(v) for k, v in metrics.items() if _is_number(v)},
        dataset_sha256=tags.get(DATASET_TAG),
        eval_config_sha256=tags.get(CONFIG_TAG),
        per_image=_per_image(_download_json(client, run_id, PER_IMAGE_ARTIFACT)),
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _recorded(client: MlflowClient, mv: Any, identity: tuple[str | None, str | None]) -> EvalRecord | None:
    """The version's own evaluation when it was made on `identity`."""
    from ddcolor.registry import version_metrics

    tags = mv.tags or {}
    if None in identity or (tags.get(DATASET_TAG), tags.get(CONFIG_TAG)) != identity:
        return None
    per_image = _per_image(_download_json(client, mv.run_id, PER_IMAGE_ARTIFACT)) if mv.run_id else None
    return EvalRecord(version_metrics(mv), *identity, per_image=per_image, source="recorded on the same data")


def _cached(client: MlflowClient, mv: Any, identity: tuple[str, str]) -> EvalRecord | None:
    key = cache_key(*identity)
    raw = (mv.tags or {}).get(CACHE_TAG_PREFIX + key)
    if not raw:
        return None
    entry = json.loads(raw)
    if (entry.get("dataset_sha256"), entry.get("eval_config_sha256")) != identity:
        return None  # a 16-hex-digit prefix collision: treat as a miss
    per_image = None
    if mv.run_id and entry.get("per_image"):
        per_image = _per_image(_download_json(client, mv.run_id, entry["per_image"]))
    source = f"re-evaluated on this val split at {entry.get('evaluated_at', '?')}, cached on its version"
    return EvalRecord(dict(entry["metrics"]), *identity, per_image=per_image, source=source)


def champion_on_same_data(
    config: Config,
    identity: tuple[str, str],
    dataset_uri: str,
    *,
    tracking_uri: str | None = None,
    networks: Mapping[str, nn.Module] | None = None,
    progress: bool = False,
) -> tuple[str, EvalRecord] | None:
    """``(version, record)`` of the champion measured on `identity` (dataset sha256, eval config sha256): recorded,
    cached, or evaluated now on `dataset_uri` and cached on its version; None when there is no champion.

    Raises:
        ValueError: `dataset_uri` is not the dataset version `identity` names, or evaluates with other settings.
        FileNotFoundError, ddcolor.model.CheckpointError: the champion's model cannot be loaded.
    """
    from ddcolor.registry import champion_version, load_registered_generator

    client = tracking_client.client(tracking_uri)
    mv = champion_version(config, tracking_uri=tracking_uri)
    if mv is None:
        return None
    version = str(mv.version)
    found = _recorded(client, mv, identity) or _cached(client, mv, identity)
    if found is not None:
        return version, found

    from ddcolor.evaluate import PER_IMAGE_FILE, eval_config_sha256, evaluate

    if eval_config_sha256(config.eval, pretrained=metric_weights(config)) != identity[1]:
        raise ValueError(
            f"this config's eval section (and metric weights) differ from those the challenger was evaluated with "
            f"(eval config {identity[1][:12]}): gate with the config of the challenger's run"
        )
    name = config.registry.model_name
    log.info("evaluating champion %s v%s on dataset %s (its recorded metrics are of other data)", name, version,
             identity[0][:12])  # fmt: skip
    model = load_registered_generator(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ddcolor-champion-eval-") as tmp:
        result = evaluate(
            model,
            dataset_uri,
            config,
            pretrained=metric_weights(config),
            metric_networks=dict(networks) if networks else None,
            out_dir=tmp,
            progress=progress,
        )
        got = (result.protocol["dataset_manifest_sha256"], result.protocol["eval_config_sha256"])
        if got != tuple(identity):
            raise ValueError(
                f"{dataset_uri} evaluates as dataset {got[0][:12]} / eval config {got[1][:12]}, not the challenger's "
                f"{identity[0][:12]} / {identity[1][:12]}: pass the dataset version the challenger was evaluated on"
            )
        key = cache_key(*identity)
        artifact = None
        if mv.run_id:
            client.log_artifact(mv.run_id, str(Path(tmp) / PER_IMAGE_FILE), f"{CACHE_ARTIFACT_DIR}/{key}")
            artifact = f"{CACHE_ARTIFACT_DIR}/{key}/{PER_IMAGE_FILE}"
    metrics = {**result.metrics, "n_images": float(result.n_images)}
    entry = {
        "metrics": metrics,
        "dataset_sha256": identity[0],
        "eval_config_sha256": identity[1],
        "dataset_uri": dataset_uri,
        "per_image": artifact,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    client.set_model_version_tag(name, version, CACHE_TAG_PREFIX + key, json.dumps(entry, sort_keys=True))
    return version, EvalRecord(metrics, *identity, per_image=result.per_image, source="evaluated in this process")


def compare_with_champion(
    run_id: str,
    config: Config,
    *,
    metrics: Mapping[str, Any] | None = None,
    dataset_uri: str | None = None,
    tracking_uri: str | None = None,
    networks: Mapping[str, nn.Module] | None = None,
) -> Comparison:
    """The challenger run's evaluation next to the champion's on the same data (see the module docstring).

    Args:
        run_id: the challenger's run (its ``val/*`` metrics, ``eval.*`` tags and ``eval/per_image.json``).
        metrics: the challenger's metrics instead of the run's.
        dataset_uri: the challenger's val dataset, to evaluate the champion on when needed; default the run's
            ``eval.dataset_uri`` tag.
        networks: metric networks to reuse (`metric_networks`).
    """
    challenger = run_record(run_id, metrics=metrics, tracking_uri=tracking_uri)
    from ddcolor.registry import champion_version

    mv = champion_version(config, tracking_uri=tracking_uri)
    if mv is None:
        return Comparison(None, challenger)
    version = str(mv.version)
    if None in challenger.identity:
        problem = f"run {run_id} has no {DATASET_TAG} / {CONFIG_TAG} tags (evaluate it with `ddcolor evaluate`)"
        return Comparison(version, challenger, problem=problem)
    if dataset_uri is None:
        dataset_uri = tracking_client.client(tracking_uri).get_run(run_id).data.tags.get(URI_TAG)
    try:
        if dataset_uri is None:
            found = _recorded(tracking_client.client(tracking_uri), mv, challenger.identity)
            found = found or _cached(tracking_client.client(tracking_uri), mv, challenger.identity)
            if found is None:
                problem = "its metrics are of other data and no dataset is known to measure it on"
                return Comparison(version, challenger, problem=problem)
            measured = (version, found)
        else:
            measured = champion_on_same_data(
                config, challenger.identity, dataset_uri, tracking_uri=tracking_uri, networks=networks
            )
    except Exception as err:  # the gate decides (fails) with the reason; a broken champion must not crash it
        log.warning("cannot measure the champion on the challenger's data: %s", err)
        return Comparison(version, challenger, problem=f"{type(err).__name__}: {err}")
    if measured is None:  # the champion alias moved away meanwhile
        return Comparison(None, challenger)
    version, champion = measured
    paired: dict[str, PairedDelta] = {}
    if challenger.per_image and champion.per_image:
        try:
            paired = paired_deltas(challenger.per_image, champion.per_image)
        except ValueError as err:  # different image counts: the identity matched, so this is a bug somewhere
            log.warning("per-image values do not pair: %s", err)
    return Comparison(version, challenger, champion, paired)
