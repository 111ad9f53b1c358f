"""``ddcolor gate``, ``promote`` and ``approve``: the MLflow model registry (`ddcolor.registry`, `ddcolor.approval`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddcolor.cli._common import ConfigOpt, JsonOpt, fail, load_params, print_json, require_tracking_server, say


def _run_id_of(run_id: str | None, model: str | None) -> str:
    """`--run-id` as given, or the training run recorded in the `--model` checkpoint; exit 1/2 when unusable."""
    from ddcolor.model.checkpoint import checkpoint_run_id

    if (run_id is None) == (model is None):
        raise fail("give exactly one of --run-id ID or --model PATH", 2)
    if run_id is not None:
        return run_id
    found = checkpoint_run_id(model)
    if found is None:
        raise fail(
            f"{model} records no MLflow run (missing, not a .safetensors checkpoint of ours, or trained with "
            "--no-track); give --run-id ID"
        )
    return found


def _mlflow_exception() -> type[Exception]:
    """MLflow's exception class (the registry needs the mlops extra; this says which `pip install` when missing)."""
    from ddcolor._optional import require

    require("mlflow", "mlops", "the model registry")
    from mlflow.exceptions import MlflowException

    return MlflowException


def gate_command(
    run_id: Annotated[str | None, typer.Option("--run-id", help="MLflow run whose model is the challenger.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Or: a trained .safetensors checkpoint; gate the MLflow run recorded in it."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", help="metrics.json from `ddcolor evaluate` (default: the run's val/* metrics)."),
    ] = None,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check a run's eval metrics against the gates and the champion; log the decision to the run; exit 1 on fail."""
    import json
    from pathlib import Path

    mlflow_exception = _mlflow_exception()
    from ddcolor.registry import gate_run

    cfg = load_params(config)
    require_tracking_server()
    run_id = _run_id_of(run_id, model)
    try:
        values = json.loads(Path(metrics).read_text()) if metrics else None
        decision = gate_run(run_id, cfg, metrics=values)
    except (OSError, ValueError, mlflow_exception) as err:  # a `RegistryError` reaches the CLI's group
        raise fail(err) from None
    say(decision.table(), json_out)
    if json_out:
        print_json({**decision.to_dict(), "run_id": run_id})
    if not decision.passed:
        raise typer.Exit(1)


def _write_promotion(path: str, record: dict, json_out: bool = False) -> None:
    """Write the promotion record as JSON (atomically: a reader never sees half a file)."""
    from ddcolor import storage

    storage.write_json(path, record)
    say(f"decision: {path}", json_out)


def promote_command(
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Register this run's model, gate it, promote it.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Or: a trained .safetensors checkpoint; promote the MLflow run recorded in it (its .json sidecar).",
        ),
    ] = None,
    do_rollback: Annotated[
        bool, typer.Option("--rollback", help="Move the champion back to its previous_champion instead.")
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Also write the outcome as JSON: decision (promoted|already_champion|rejected|rolled_back), "
            "promoted, gate_passed, version, champion, previous_champion, run_id, checks (for `dvc metrics show`).",
        ),
    ] = None,
    fail_on_reject: Annotated[
        bool,
        typer.Option(
            "--fail-on-reject/--no-fail-on-reject",
            help="Exit 1 when the gate rejects the challenger (default); --no-fail-on-reject exits 0 (the rejection "
            "is a result, recorded by --out: pipelines such as `dvc repro`).",
        ),
    ] = True,
    config: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a run's model (alias challenger), gate its val/* metrics, move the champion alias if it passed."""
    mlflow_exception = _mlflow_exception()
    from ddcolor.pipeline import promotion_record, rollback_record
    from ddcolor.registry import gate_run, promote, register, rollback

    if do_rollback and (run_id is not None or model is not None):
        raise fail("give exactly one of --run-id ID, --model PATH or --rollback", 2)
    cfg = load_params(config)
    require_tracking_server()
    if do_rollback:
        try:
            result = rollback(cfg)
        except mlflow_exception as err:
            raise fail(err) from None
        record, line = rollback_record(cfg, result)
        say(line, json_out)
        if out:
            _write_promotion(out, record, json_out)
        if json_out:
            print_json(record)
        return
    run_id = _run_id_of(run_id, model)
    try:
        decision = gate_run(run_id, cfg)
        version = register(run_id, None, cfg)
        result = promote(version, decision, cfg)
    except mlflow_exception as err:
        raise fail(err) from None
    say(decision.table(), json_out)
    record, line = promotion_record(cfg, run_id, version, decision, result)
    say(line, json_out)
    if out:
        _write_promotion(out, record, json_out)
    if json_out:
        print_json(record)
    if record["decision"] == "rejected" and fail_on_reject:
        raise typer.Exit(1)


def approve_command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="RUN_OR_VERSION", help="The paused train-ddcolor flow run id, or the registered version number."
        ),
    ],
    reject: Annotated[bool, typer.Option("--reject", help="Reject: the champion stays.")] = False,
    comment: Annotated[
        str, typer.Option("--comment", "-m", help="Why (recorded on the version as approval.comment).")
    ] = "",
    by: Annotated[str | None, typer.Option("--by", help="Who answers (default: the login name).")] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="params.yaml (registry names). Default: ./params.yaml if present, else defaults.",
        ),
    ] = None,
) -> None:
    """Approve (or --reject) a challenger waiting for a person (gates.require_approval): resumes its paused flow run,
    or finishes a version held by a run without Prefect. Exit 1 when there is nothing to answer."""
    import getpass

    from ddcolor.approval import answer

    cfg = load_params(config)
    require_tracking_server()
    typer.echo(answer(target, cfg, approve=not reject, comment=comment, approver=by or getpass.getuser()))
