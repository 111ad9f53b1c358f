"""``ddcolor pipeline``, ``demo`` and ``automations apply``: the whole pipeline (`ddcolor.pipeline`, the
``train-ddcolor`` Prefect flow) and what surrounds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from ddcolor.cli._common import (
    ConfigOpt,
    DeviceName,
    PrecisionName,
    fail,
    load_flow,
    load_params,
    model_error,
    overrides_argument,
    params_path,
)

if TYPE_CHECKING:
    from ddcolor.pipeline import PipelineResult

#: The flow parameters that are config sections (``{"train": {"max_steps": 50}, ...}``).
CONFIG_SECTIONS = ("data", "validate", "model", "train", "eval", "gates", "registry")


def _flow_sections(overrides: list[str]) -> dict[str, dict]:
    """``["train.max_steps=50", "model.pretrained=null"]`` -> flow parameters ``{"train": {"max_steps": 50}, ...}``
    (values parsed as YAML, as `load_config` does; the flow validates them)."""
    import yaml

    sections: dict[str, dict] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise fail(f"override {item!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=50", 2)
        sections.setdefault(section, {})[name] = yaml.safe_load(raw) if raw.strip() else None
    return sections


def _pipeline(params: dict[str, Any], no_prefect: bool, progress: bool) -> PipelineResult:
    """Run the pipeline: the `train-ddcolor` flow with `params`, or `run_pipeline` in this process with the same
    configuration (`no_prefect`). The `PipelineResult`; exit 1 when validation failed."""
    import os
    import sys

    from ddcolor.config import load_config
    from ddcolor.pipeline import PipelineResult, run_pipeline, section_overrides

    if not sys.stdout.isatty():  # MLflow's download bars are for people at a terminal, not for logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if no_prefect:
        sections = {key: params[key] for key in CONFIG_SECTIONS if key in params}
        cfg = load_config(params["config_path"], section_overrides(**sections))  # as the flow loads it
        result = run_pipeline(
            cfg,
            params["source"],
            work_dir=params["work_dir"],
            force=params["force"],
            progress=progress,
            colorize=params["colorize"],
            nproc_per_node=params["nproc_per_node"],
        )
        typer.echo(result.summary())
    else:
        state = load_flow("train_ddcolor", "train_ddcolor")(**params, return_state=True)
        if not state.is_completed():
            raise fail(f"flow run {state.name}: {state.message}")
        result = PipelineResult(**state.result())  # the flow has logged its summary
    if result.status == "validation_failed":
        raise fail(result.reason)
    return result


def pipeline_command(
    overrides: Annotated[list[str] | None, overrides_argument("train.max_steps=50 gates.max_fid=30")] = None,
    source: Annotated[
        str | None, typer.Option("--source", "-s", help="Raw images (folder or s3://). Default: data.source.")
    ] = None,
    config: ConfigOpt = None,
    work_dir: Annotated[
        str, typer.Option("--work-dir", "-o", help="Reports, training runs and the sample grid go here.")
    ] = "runs/pipeline",
    force: Annotated[
        bool, typer.Option("--force", help="Train even if the champion has the same data and config.")
    ] = False,
    no_prefect: Annotated[
        bool, typer.Option("--no-prefect", help="Run the steps in this process without Prefect.")
    ] = False,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", min=1, help="GPUs for torchrun DDP training.")] = 1,
    nnodes: Annotated[
        int, typer.Option("--nnodes", min=1, help="Nodes of a multi-node torchrun (c10d rendezvous).")
    ] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's rank, 0 .. nnodes-1.")] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option("--rdzv-endpoint", help="HOST[:PORT] every node reaches (node 0; port 29400 by default)."),
    ] = None,
    rdzv_id: Annotated[
        str | None, typer.Option("--rdzv-id", help="Rendezvous id, the same on every node of a run.")
    ] = None,
    colorize: Annotated[
        bool, typer.Option("--colorize/--no-colorize", help="Colorize the sample photos at the end.")
    ] = True,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bars (--no-prefect only).")
    ] = True,
    ingest_task_runner: Annotated[
        str | None,
        typer.Option(
            "--ingest-task-runner",
            help="Fan ingestion out as Prefect tasks on: thread, process, dask[://host:port], ray[://host:port] "
            "(not with --no-prefect). Default: a local process pool.",
        ),
    ] = None,
) -> None:
    """Ingest -> validate -> train -> evaluate -> gate -> promote -> colorize, as the `train-ddcolor` Prefect flow.

    Skips training when the champion was trained on the same dataset version and config (unless --force). Exit code
    0 when the run completed (promoted, not promoted by the gates, or skipped), 1 when validation or a step failed,
    2 on a bad configuration. Without PREFECT_API_URL the flow runs on a local Prefect database in ./.prefect.
    """
    path = params_path(config)
    load_params(config, overrides or [])  # a bad key is exit 2 before anything starts
    if ingest_task_runner is not None and no_prefect:
        raise fail("--ingest-task-runner needs the Prefect flow; drop --no-prefect", 2)
    params = {
        "config_path": path,
        "source": source,
        **_flow_sections(overrides or []),
        "force": force,
        "work_dir": work_dir,
        "nproc_per_node": nproc_per_node,
        "colorize": colorize,
    }
    if ingest_task_runner is not None:
        params["ingest_task_runner"] = ingest_task_runner
    if nnodes > 1 or rdzv_endpoint:
        from ddcolor.launch import Rendezvous

        if no_prefect:
            raise fail("--nnodes/--rdzv-endpoint need the Prefect flow; drop --no-prefect", 2)
        try:
            Rendezvous(nnodes, node_rank, rdzv_endpoint)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--nnodes") from None
        params.update(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    _pipeline(params, no_prefect, progress)


# --- demo ------------------------------------------------------------------------------------------------------
def demo_command(
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder (data/, runs/, samples/grid.png, ...).")
    ] = "demo_out",
    colorize_only: Annotated[
        bool,
        typer.Option("--colorize-only", help="Only colorize the sample photos (no training): gray/, color/, grid.png."),
    ] = False,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Training steps (default: about 2 minutes on CPU).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Retrain even if data and config are unchanged.")] = False,
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Run the pipeline without Prefect.")] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="(--colorize-only) Release name, checkpoint or models:/ URI; default: ddcolor_paper_tiny if cached, "
            "else random-init atto (warned).",
        ),
    ] = None,
    input_size: Annotated[
        int, typer.Option("--input-size", help="(--colorize-only) Network resolution, px (x32).")
    ] = 256,
    device: Annotated[DeviceName, typer.Option("--device", help="(--colorize-only) Where the network runs.")] = "auto",
    precision: Annotated[
        PrecisionName,
        typer.Option(
            "--precision",
            help="Training precision (train.amp; fp32 = none), or with --colorize-only the network's: auto = bf16 on "
            "a GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else fp32.",
        ),
    ] = "auto",
    random_init: Annotated[
        bool, typer.Option("--random-init", help="(--colorize-only) Force a random-init atto model (smoke test).")
    ] = False,
) -> None:
    """The whole platform on built-in samples: ingest, validate, train atto for ~2 minutes on CPU, evaluate, gate,
    promote, colorize the sample photos with the champion. Re-running skips training when nothing changed.

    Runs the `train-ddcolor` Prefect flow on a local Prefect database (./.prefect) and MLflow at MLFLOW_TRACKING_URI
    (default sqlite:///mlflow.db); the model is registered as `ddcolor-demo`. --colorize-only (implied by --model or
    --random-init) only colorizes the photos with a released or random-init model.
    """
    if model is not None or random_init:
        colorize_only = True
    if colorize_only:
        _colorize_demo(out, model, input_size, device, precision, random_init)
        return
    _pipeline_demo(out, steps, force, no_prefect, precision)


def _pipeline_demo(out: str, steps: int | None, force: bool, no_prefect: bool, precision: str = "auto") -> None:
    """The demo's pipeline run on the sample photos, then where to look: grid, MLflow, Prefect, next commands."""
    import time
    from pathlib import Path

    from ddcolor import demo
    from ddcolor.config import EnvSettings
    from ddcolor.data.samples import write_samples
    from ddcolor.tracking.client import ui_fragment

    started = time.monotonic()
    params, warnings = demo.pipeline_demo_params(
        out, steps=steps or demo.PIPELINE_DEMO_STEPS, precision=precision, force=force
    )  # the whole recipe: never ./params.yaml
    for warning in warnings:
        typer.echo(f"WARNING: {warning}", err=True)
    typer.echo(demo.estimate_message(demo.pipeline_demo_config(params)))
    write_samples(params["data"]["source"], demo.PIPELINE_DEMO_IMAGES)
    result = _pipeline(params, no_prefect, progress=True)
    name = params["registry"]["model_name"]
    tracking = EnvSettings.from_env().mlflow_tracking_uri
    ui = tracking  # a server: its runs table below; a local store: the command that serves it
    if not tracking.startswith("http"):
        ui = f"{_venv_command('mlflow')} ui --backend-store-uri {tracking}, then open http://127.0.0.1:5000/"
    experiment_id = _experiment_id(tracking, params["registry"].get("experiment_name", name))
    if experiment_id is not None:
        ui = ui.rstrip("/") + "/" + ui_fragment(experiment_id)
    typer.echo("")
    typer.echo(f"demo finished in {time.monotonic() - started:.0f} s: {result.status.replace('_', ' ')}")
    typer.echo(f"  sample grid (gray | champion | original): {result.grid}")
    typer.echo(f"  output folder:  {Path(out).resolve()}")
    typer.echo(f"  MLflow:         {ui}   (experiment {name}, registered model {name})")
    if not no_prefect:
        home = Path(".prefect").resolve()
        prefect = _venv_command("prefect")
        typer.echo(f"  Prefect:        PREFECT_HOME={home} {prefect} server start   (flow train-ddcolor)")
    ddcolor = _venv_command("ddcolor")
    typer.echo(f"  your photos:    {ddcolor} colorize PHOTOS -o OUT --model models:/{name}@champion")
    typer.echo(f"  playground:     {ddcolor} ui --registered-model {name}   (http://127.0.0.1:7860/)")
    if params["model"].get("pretrained") is None or params["eval"].get("metric_weights") == "random":
        typer.echo("  (trained and scored without pretrained weights: see the warnings above)", err=True)


def _experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of experiment `name` in `tracking_uri`, or None when it cannot be read (the demo then prints less)."""
    from ddcolor.tracking import client as tracking_client

    try:
        experiment = tracking_client.client(tracking_uri).get_experiment_by_name(name)
    except Exception:  # only a nicer link is lost
        return None
    return experiment.experiment_id if experiment else None


def _venv_command(name: str) -> str:
    """How to call this environment's `name` from a new shell: plain `name` when that is what PATH finds, else its
    path (``.venv/bin/mlflow`` relative to the working directory when inside it), so printed commands work as
    printed without activating the virtualenv."""
    import shutil
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / name
    if not script.is_file() or shutil.which(name) == str(script):
        return name
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _colorize_demo(out: str, model: str | None, input_size: int, device: str, precision: str, random_init: bool):
    """``demo --colorize-only``: the sample photos colorized by a release, a checkpoint or a random-init model."""
    from ddcolor.demo import run_demo

    if random_init and model is not None:
        raise typer.BadParameter("give either --model or --random-init, not both", param_hint="--model")
    try:
        result = run_demo(
            out, model=model, input_size=input_size, device=device, precision=precision, random_init=random_init
        )
    except (FileNotFoundError, ValueError) as err:  # also a damaged checkpoint or missing weights file
        raise model_error(err) from None
    typer.echo(result.report.summary())
    typer.echo(f"model: {result.model}")
    typer.echo(f"grid: {result.grid}")
    if result.random_init:
        typer.echo(
            "WARNING: random-init model: the colors are meaningless. Fetch weights "
            "(`ddcolor weights fetch ddcolor_paper_tiny`) or train a model, then rerun (`--model NAME_OR_PATH`).",
            err=True,
        )


# --- automations -----------------------------------------------------------------------------------------------
automations_app = typer.Typer(no_args_is_help=True, help="Prefect automations (notifications) kept in the repository.")


@automations_app.command("apply")
def automations_apply(
    file: Annotated[
        str, typer.Option("--file", "-f", help="Automations file (Prefect automation schema).")
    ] = "infra/prefect/automations.yaml",
) -> None:
    """Create or update the notification block (URL from the variable the file names, e.g.
    DDCOLOR_NOTIFY_WEBHOOK_URL) and every automation of FILE, by name, on the server in PREFECT_API_URL."""
    from ddcolor.automations import AutomationsError, apply_automations

    try:
        names = apply_automations(file)
    except AutomationsError as err:  # a bad automations file is a usage error (exit 2), not a failed run
        raise fail(err, 2) from None
    for name in names:
        typer.echo(f"automation applied: {name}")
