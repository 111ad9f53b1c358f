"""Model cards: one Markdown document per registered version, saying what the model is, what it was trained and
measured on, and why it was (not) promoted.

`build_model_card` reads everything from MLflow (the version's tags, its training run's params, metrics and
artifacts, the champion it was compared with) and returns Markdown; `attach_model_card` also logs it as the run
artifact ``model_card.md`` and stores it on the version (tag ``model_card``, what the playground shows; tag
``model_card_uri``, the artifact). The pipeline attaches one to every version it registers, and the Prefect flow
publishes it as the artifact ``ddcolor-model-card``.

Sections: a loud warning when weights or metric networks were random; intended use and limitations; training data
(dataset version, row counts, DVC md5, manifest sha256, source URIs); base weights and their licences; config
diff against the champion; metrics with ``n_images`` and the paired deltas with 95% intervals; the gate decision;
approval (if any); the sample grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ddcolor.tracking import client as tracking_client

if TYPE_CHECKING:
    from ddcolor.config import Config
    from ddcolor.gates import GateDecision

__all__ = ["CARD_ARTIFACT", "CARD_TAG", "CARD_URI_TAG", "attach_model_card", "build_model_card", "card_from_tags"]

log = logging.getLogger(__name__)

CARD_ARTIFACT = "model_card.md"
CARD_TAG = "model_card"
CARD_URI_TAG = "model_card_uri"
#: What is known of the licence of each base weight file (the weights registry in `ddcolor.weights` names them).
_DDCOLOR_LICENCE = (
    "DDColor (piddnad/DDColor) code and released models: Apache-2.0. This model's own weights were trained by this "
    "pipeline; they are yours, under the terms of the data they were trained on."
)
INTENDED_USE = """\
- **Intended use:** automatic colorization of grayscale photographs (historic photos, scans) for viewing and as a
  starting point for human retouching. Input: any gray or color image (only its lightness L is used); output: the same
  image with predicted a*b* chroma.
- **Not for:** recovering the true colors of a scene (colors are plausible guesses, not measurements), forensic or
  medical imagery, or any decision about people. Skin tones, uniforms, flags and brand colors can be wrong and can
  reproduce biases of the training photos.
- **Limitations:** quality follows the training data (subject matter, era, camera); out-of-domain inputs (drawings,
  infrared, heavy noise, very low resolution) give desaturated or wrong colors. Metrics below are computed on the
  validation split of the training dataset version only; FID needs >= 2048 images to mean much.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None or value == "" else str(value)


def _run(client: Any, run_id: str | None) -> Any | None:
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as err:  # a card is documentation: a missing piece is said, not fatal
        log.warning("model card: cannot read run %s: %s", run_id, err)
        return None


def _manifest_counts(uri: str | None) -> dict[str, Any]:
    if not uri:
        return {}
    try:
        from ddcolor.data.manifest import read_manifest

        return dict(read_manifest(uri).get("counts") or {})
    except Exception as err:
        log.info("model card: dataset %s not readable for row counts: %s", uri, err)
        return {}


def _base_weights(params: Mapping[str, str]) -> list[str]:
    from ddcolor import weights
    from ddcolor.presets import PRESETS

    lines = [f"- {_DDCOLOR_LICENCE}"]
    preset = params.get("model.preset")
    backbone = params.get("model.backbone")
    pretrained = params.get("model.pretrained")
    if pretrained in (None, "", "None", "null"):
        lines.append(f"- Encoder ({backbone or preset}): **random initialisation** (model.pretrained: null).")
    else:
        name = backbone if backbone not in (None, "", "None") else (PRESETS[preset].imagenet_weights if preset in
                                                                    PRESETS else None)  # fmt: skip
        spec = weights.REGISTRY.get(name) if name else None
        if spec is not None:
            lines.append(
                f"- Encoder: `{spec.name}` ({spec.description}); weight file licence {spec.license} (timm / Hugging "
                "Face `timm` organisation). Trained on ImageNet, whose images come with ImageNet's own terms of "
                "access (non-commercial research); check them before commercial use."
            )
        else:
            lines.append(f"- Encoder: `{name}` (timm); licence not recorded in ddcolor's weights registry: check it.")
    init = params.get("train.init") or params.get("init")
    if init:
        lines.append(f"- Initialised from: `{init}` (official DDColor releases: Apache-2.0).")
    if params.get("train.loss_perceptual") not in (None, "0", "0.0"):
        lines.append("- Perceptual loss: torchvision VGG16-BN ImageNet weights (BSD-3-Clause), training only.")
    metric = params.get("eval.metric_weights")
    if metric == "random":
        lines.append("- Metric networks (Inception for FID, AlexNet for LPIPS): **random** (eval.metric_weights).")
    else:
        lines.append("- Metric networks: pytorch-fid InceptionV3 (Apache-2.0), torchvision AlexNet (BSD-3-Clause).")
    return lines


def _config_diff(mine: Mapping[str, str], theirs: Mapping[str, str] | None) -> list[str]:
    if theirs is None:
        return ["No champion to compare with (first version, or its run is not readable)."]
    keys = sorted(k for k in set(mine) | set(theirs) if "." in k and mine.get(k) != theirs.get(k))
    if not keys:
        return ["Same configuration as the champion."]
    out = ["| key | champion | this version |", "|---|---|---|"]
    out += [f"| `{k}` | {_fmt(theirs.get(k))} | {_fmt(mine.get(k))} |" for k in keys]
    return out


def build_model_card(
    config: Config,
    version: str,
    *,
    tracking_uri: str | None = None,
    decision: GateDecision | None = None,
) -> str:
    """The Markdown model card of registered version `version` of ``registry.model_name`` (see the module docstring).

    `decision` defaults to the version's ``blessing`` tag.
    """
    from ddcolor.registry import blessing, version_metrics

    client = tracking_client.client(tracking_uri)
    name = config.registry.model_name
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    decision = decision or blessing(tags)
    run_id = tags.get("lineage.run_id") or mv.run_id
    run = _run(client, run_id)
    params = dict(run.data.params) if run else {}
    metrics = version_metrics(mv)
    champion_params = None
    if decision and decision.champion_version:
        champ = client.get_model_version(name, decision.champion_version)
        champ_run = _run(client, (champ.tags or {}).get("lineage.run_id") or champ.run_id)
        champion_params = dict(champ_run.data.params) if champ_run else None

    out = [f"# Model card: {name} v{version}", ""]
    warnings = []
    if params.get("model.pretrained") in ("None", "", None) and run is not None:
        warnings.append("the encoder started from RANDOM weights (model.pretrained: null)")
    if params.get("eval.metric_weights") == "random" or tags.get("eval.metric_weights") == "random":
        warnings.append("FID and LPIPS were computed with RANDOM metric networks: those values are MEANINGLESS")
    n = metrics.get("n_images")
    if n is not None and "fid" in metrics and n < config.gates.min_fid_images:
        warnings.append(f"FID was measured on {n:.0f} images (< {config.gates.min_fid_images}): mostly bias")
    for warning in warnings:
        out += [f"> **WARNING: {warning}.**", ">"]
    if warnings:
        out += ["> Do not judge or ship this model by these numbers.", ""]
    aliases = ", ".join(f"@{a}" for a in (mv.aliases or [])) or "none"
    out += [f"Aliases: {aliases}. Training run: `{run_id}`. Git commit: `{tags.get('git.commit', '-')}`"]
    out += ["", "## Intended use and limitations", "", INTENDED_USE]

    counts = _manifest_counts(tags.get("dataset.uri"))
    out += ["## Training data", "", "| | |", "|---|---|"]
    out += [
        f"| dataset | `{tags.get('dataset.uri', '-')}` |",
        f"| rows | {_fmt(counts.get('rows') or tags.get('dataset.rows'))} (train {_fmt(counts.get('train'))}, val "
        f"{_fmt(counts.get('val'))}, low-colorfulness {_fmt(counts.get('low_colorfulness'))}) |",
        f"| manifest sha256 | `{tags.get('dataset.manifest_sha256', '-')}` |",
        f"| DVC md5 | `{tags.get('dataset.dvc_md5') or '-'}` |",
        f"| source URIs | `{params.get('data.source', '-')}` |",
        f"| fingerprint (data + config) | `{tags.get('pipeline.fingerprint', '-')}` |",
        "",
    ]
    out += ["## Base weights and licences", "", *_base_weights(params), ""]
    champion = f" v{decision.champion_version}" if decision and decision.champion_version else ""
    out += [f"## Configuration vs the champion{champion}", "", *_config_diff(params, champion_params), ""]

    out += ["## Metrics", ""]
    if decision and decision.comparison:
        out += [f"Measured on: {decision.comparison}", ""]
    out += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    out.append("")
    if decision and decision.paired:
        out += ["Paired with the champion on the same images (challenger − champion, bootstrap 95% interval):", ""]
        out += ["| metric | n | mean Δ | 95% interval |", "|---|---|---|---|"]
        for metric, d in decision.paired.items():
            out.append(f"| {metric} | {d['n']} | {d['mean_delta']:+.4g} | [{d['ci_low']:+.4g}, {d['ci_high']:+.4g}] |")
        out.append("")
    out += ["## Gate decision", ""]
    out += [decision.table() if decision else "No gate decision recorded on this version.", ""]
    approval = {k: v for k, v in tags.items() if k.startswith("approval.")}
    out += ["## Approval", ""]
    if approval:
        out += [f"- {k.removeprefix('approval.')}: {v}" for k, v in sorted(approval.items())]
    else:
        out.append("No human approval recorded (gates.require_approval is off, or the decision is pending).")
    out.append("")
    grids = []
    if run is not None:
        try:
            grids = [a.path for a in client.list_artifacts(run_id, "eval") if a.path.endswith("samples.png")]
        except Exception:  # pragma: no cover - artifact store unreachable
            grids = []
    out += ["## Sample grid", ""]
    if grids:
        where = f"runs:/{run_id}/{grids[0]}"
        link = ""
        if tracking_client.is_http(client.tracking_uri):
            link = f"\n\n![samples]({client.tracking_uri.rstrip('/')}/get-artifact?path={grids[0]}&run_uuid={run_id})"
        out += [f"Validation images, gray input | prediction | ground truth: `{where}`{link}", ""]
    else:
        out += ["No sample grid logged with the run.", ""]
    return "\n".join(out)


def attach_model_card(
    config: Config, version: str, *, tracking_uri: str | None = None, decision: GateDecision | None = None
) -> str:
    """`build_model_card`, logged as run artifact ``model_card.md`` and stored on the version (tags ``model_card``,
    ``model_card_uri``); returns the Markdown."""
    import tempfile
    from pathlib import Path

    card = build_model_card(config, version, tracking_uri=tracking_uri, decision=decision)
    client = tracking_client.client(tracking_uri)
    name = config.registry.model_name
    mv = client.get_model_version(name, str(version))
    run_id = (mv.tags or {}).get("lineage.run_id") or mv.run_id
    if run_id:
        with tempfile.TemporaryDirectory(prefix="ddcolor-card-") as tmp:
            path = Path(tmp) / CARD_ARTIFACT
            path.write_text(card)
            client.log_artifact(run_id, str(path))
        client.set_model_version_tag(name, str(version), CARD_URI_TAG, f"runs:/{run_id}/{CARD_ARTIFACT}")
    client.set_model_version_tag(name, str(version), CARD_TAG, card)
    return card


def card_from_tags(tags: Mapping[str, str]) -> str | None:
    """The model card stored on a version (its tags), or None."""
    return tags.get(CARD_TAG) or None
