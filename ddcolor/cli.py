"""The `ddcolor` command line. Most commands wrap one library function; finetune, evaluate and promote still hold
some pipeline logic of their own (tracker lifecycle, fine-tune composition, the promotion record)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import typer
from typer.core import TyperGroup

EXIT_MISSING_EXTRA = 3  # an optional dependency is not installed (the message names the `pip install` to run)


class _Group(TyperGroup):
    """Turns a missing optional dependency anywhere in a command into its `pip install 'ddcolor[extra]'` hint."""

    def invoke(self, ctx):
        from ddcolor._optional import missing_extra
        from ddcolor.config import ConfigError
        from ddcolor.errors import DDColorError

        try:
            return super().invoke(ctx)
        except ImportError as exc:
            hint = missing_extra(exc)
            if hint is None:
                raise
            typer.echo(f"Error: {hint}", err=True)
            raise typer.Exit(EXIT_MISSING_EXTRA) from None
        except DDColorError as exc:
            # An expected failure (bad file, unreachable service, bad config...): its message names the file or
            # service and what to do. Tracebacks are for bugs, and for -v.
            if ctx.params.get("verbose"):
                raise
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(2 if isinstance(exc, ConfigError) else 1) from None


app = typer.Typer(
    cls=_Group, no_args_is_help=True, add_completion=True, help="DDColor platform: colorize, train, evaluate."
)


def _json_option():
    return typer.Option(
        False, "--json", help="Print one JSON document on stdout, for CI (human-readable lines go to stderr)."
    )


def _say(text: str, json_out: bool) -> None:
    """Human-readable output: stdout, or stderr when --json keeps stdout for the JSON document."""
    typer.echo(text, err=json_out)


def _print_json(obj: object) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- weights -------------------------------------------------------------------------------------------
weights_app = typer.Typer(no_args_is_help=True, help="Inspect and fill the local weights cache.")
app.add_typer(weights_app, name="weights")


def _weights_fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"Error: {exc}", err=True)
    return typer.Exit(1)


@weights_app.command("list")
def weights_list(
    verify: bool = typer.Option(False, "--verify", help="Also hash and check present files (slow for GBs)."),
    json_out: bool = _json_option(),
) -> None:
    """Show every known weight file: kind, present/missing, size, path."""
    from ddcolor import weights

    rows = weights.status(verify=verify)
    if json_out:
        _print_json(
            {
                "cache_dir": str(weights.cache_dir()),
                "weights": [
                    {"name": r.name, "kind": r.kind, "present": r.present, "path": str(r.path)}
                    | {"size_bytes": r.size_bytes, "verified": r.verified}
                    for r in rows
                ],
            }
        )
        if any(r.verified is False for r in rows):
            raise typer.Exit(1)
        return
    table = [("NAME", "KIND", "STATE", "SIZE", "PATH")]
    for r in rows:
        state = "missing" if not r.present else {None: "present", True: "ok", False: "CORRUPT"}[r.verified]
        size = f"{r.size_bytes / 2**20:.1f} MiB" if r.size_bytes is not None else "-"
        table.append((r.name, r.kind, state, size, str(r.path)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    typer.echo(f"cache: {weights.cache_dir()}  (set {weights.ENV_VAR} to change)")
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    if any(r.verified is False for r in rows):
        raise typer.Exit(1)


@weights_app.command("fetch")
def weights_fetch(
    name: str = typer.Argument(..., metavar="NAME", help="Registry name (see `weights list`), or 'all'."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached (replaces a bad file)."),
) -> None:
    """Download a weight file into the cache (needs internet)."""
    from ddcolor import weights

    names = list(weights.REGISTRY) if name == "all" else [name]
    try:
        for n in names:
            typer.echo(f"{n}: {weights.fetch(n, force=force)}")
    except (weights.WeightsError, OSError) as e:
        raise _weights_fail(e) from None


@weights_app.command("import")
def weights_import(
    file: str = typer.Argument(..., metavar="FILE", help="A weight file downloaded elsewhere."),
    name: str | None = typer.Option(None, "--name", help="Registry name; inferred from the file name if absent."),
) -> None:
    """Copy a downloaded weight file into the cache, sha256-checked (for air-gapped machines)."""
    from ddcolor import weights

    try:
        path = weights.import_file(file, name)
    except (weights.WeightsError, OSError) as e:
        raise _weights_fail(e) from None
    typer.echo(f"imported: {path}")


# --- colorize ------------------------------------------------------------------------------------------
def _model_error(exc: BaseException) -> typer.Exit:
    """Print a model-loading error (its message says what to run) and exit 1."""
    msg = str(exc).strip("'\"")
    if isinstance(exc, FileNotFoundError) and "ddcolor weights" not in msg:
        msg += " (see `ddcolor weights list`; fetch a release with `ddcolor weights fetch NAME`)"
    typer.echo(f"Error: {msg}", err=True)
    return typer.Exit(1)


@app.command("colorize")
def colorize_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT", help="Image or video files, folders (searched recursively) or quoted glob patterns."
        ),
    ],
    out: str = typer.Option(
        ..., "--out", "-o", help="Output folder; or an output file name (out.png, out.mp4) for a single input."
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Official release name (ddcolor_paper_tiny, ddcolor_paper, ddcolor_modelscope, ddcolor_artistic; "
        "see `ddcolor weights list`), a .safetensors or official .pth checkpoint, or models:/NAME@ALIAS "
        "(once the registry exists). Required unless --random-init.",
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="Preset (atto|tiny|large) of an official .pth (inferred if absent) or for --random-init."
    ),
    input_size: int = typer.Option(512, "--input-size", help="Network resolution, px (multiple of 32)."),
    ab_upsample: Literal["bilinear", "nearest"] = typer.Option(
        "bilinear", "--ab-upsample", help="How ab returns to full size; nearest reproduces the official pipeline."
    ),
    device: Literal["auto", "cpu", "cuda", "mps"] = typer.Option("auto", "--device", help="Where the network runs."),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto",
        "--precision",
        help="Network precision: auto = bf16 on a GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else fp32.",
    ),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Images per forward pass."),
    fmt: str | None = typer.Option(None, "--format", help="Output format png|jpg|webp|tif|bmp; default: the input's."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs (inputs are never replaced)."),
    max_pixels: int | None = typer.Option(
        None,
        "--max-pixels",
        min=0,
        help="Skip images with more pixels (decompression-bomb guard); 0 = no limit. "
        "Default: data.max_image_pixels of params.yaml (89,478,485).",
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Use a random-init model (atto unless --preset): smoke tests, MEANINGLESS colors."
    ),
    engine: Literal["torch", "onnx"] = typer.Option(
        "torch", "--engine", help="torch, or onnx (onnxruntime; --model may be an .onnx file from export-onnx)."
    ),
    crf: int = typer.Option(
        18, "--crf", min=0, max=51, help="(video) H.264 quality: 0 lossless .. 51; 18 ~ visually lossless."
    ),
    temporal: Literal["flow", "off"] = typer.Option(
        "flow", "--temporal", help="(video) flow: stabilise colors over time (optical flow); off: plain per-frame."
    ),
    temporal_strength: float = typer.Option(
        0.8,
        "--temporal-strength",
        min=0.0,
        max=1.0,
        help="(video) Weight of the propagated color where motion is reliable.",
    ),
    segment_frames: int = typer.Option(
        300, "--segment-frames", min=1, help="(video) Frames per resumable segment (a re-run reuses finished ones)."
    ),
) -> None:
    """Colorize images and videos: files, folders (recursive) or globs, written to -o.

    Images keep their format and metadata. Videos (.mp4, .mkv, .mov, ...; -o out.mkv picks the container) keep
    timestamps, rotation, audio and subtitles; they are encoded H.264 at --crf, stabilised over time unless
    --temporal off, and resume from finished segments when re-run after an interruption.
    """
    from ddcolor import colorize, weights
    from ddcolor._optional import MissingExtraError
    from ddcolor.imageio import default_max_pixels
    from ddcolor.model import OFFICIAL_RELEASES, CheckpointError

    if random_init and model is not None:
        raise typer.BadParameter("give either --model or --random-init, not both", param_hint="--model")
    if not random_init and model is None:
        raise typer.BadParameter(
            f"which model? Pass an official release ({', '.join(OFFICIAL_RELEASES)}; fetch it first with "
            "`ddcolor weights fetch ddcolor_paper_tiny`), a .safetensors/.pth checkpoint file, or --random-init "
            "for a smoke test with meaningless colors.",
            param_hint="--model",
        )
    try:
        if random_init:
            typer.echo("WARNING: " + colorize.RANDOM_INIT_WARNING.format(preset=preset or "atto"), err=True)
            network = colorize.random_init_model(preset or "atto", warn=False)
        elif model.endswith(".onnx"):
            network = model  # loaded by the onnx engine
            engine = "onnx"
        else:
            network = colorize.load_colorization_model(model, preset=preset)
        colorizer = colorize.Colorizer(
            network,
            input_size,
            ab_upsample=ab_upsample,
            device=device,
            precision=precision,
            batch_size=batch_size,
            engine=engine,
        )
    except (weights.WeightsError, FileNotFoundError, CheckpointError, ValueError) as err:
        raise _model_error(err) from None
    limit = default_max_pixels() if max_pixels is None else (max_pixels or None)
    try:
        try:
            from ddcolor import video
        except MissingExtraError as err:  # images still work without the video extra
            logging.getLogger(__name__).info("videos are not supported here: %s", err)
            video = None
        if video is None:
            report = colorize.colorize_files(
                colorizer, inputs, out, format=fmt, overwrite=overwrite, max_pixels=limit, progress=True
            )
        else:
            videos = video.VideoColorizer(
                colorizer,
                temporal=temporal,
                strength=temporal_strength,
                crf=crf,
                segment_frames=segment_frames,
                progress=True,
            )
            report = video.colorize_media(
                colorizer, inputs, out, video=videos, format=fmt, overwrite=overwrite, max_pixels=limit, progress=True
            )
    except ValueError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


@app.command("colorize-archive")
def colorize_archive_command(
    source: Annotated[str, typer.Argument(metavar="SRC", help="Folder or s3://bucket/prefix of images (recursive).")],
    out: str = typer.Option(..., "--out", "-o", help="Output folder or s3:// prefix (same relative paths)."),
    model: str = typer.Option(
        ..., "--model", "-m", help="models:/NAME@ALIAS (pinned to its version for the run), a checkpoint or a release."
    ),
    task_runner: str | None = typer.Option(
        None,
        "--task-runner",
        help="Run as the colorize-archive Prefect flow on: process, dask[://host:port], ray[://host:port]. "
        "Default: a local process pool, without Prefect.",
    ),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="Processes (local pool / process runner / temporary dask); default: cores."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Files per task."),
    input_size: int = typer.Option(512, "--input-size", help="Network resolution, px (multiple of 32)."),
    ab_upsample: Literal["bilinear", "nearest"] = typer.Option("bilinear", "--ab-upsample"),
    device: Literal["auto", "cpu", "cuda", "mps"] = typer.Option("auto", "--device"),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option("auto", "--precision"),
    max_pixels: int | None = typer.Option(
        None, "--max-pixels", min=0, help="Decompression-bomb guard per image; 0 = no limit. Default as colorize."
    ),
    torch_threads: int | None = typer.Option(
        None, "--torch-threads", min=1, help="Torch threads per worker process (default: torch's; cores/--workers)."
    ),
) -> None:
    """Colorize a whole collection (resumable): outputs keep each input's format, size and metadata; a manifest
    (DST/colorize-manifest.parquet) accounts for every input; a rerun skips what this model already colorized.

    Exit 0 when every input is colorized or skipped, 1 when some failed (listed), 2 on bad arguments.
    """
    from ddcolor import archive, fanout
    from ddcolor.imageio import default_max_pixels

    limit = default_max_pixels() if max_pixels is None else (max_pixels or None)
    if task_runner is not None:
        try:
            fanout.parse_task_runner(task_runner, "--task-runner")
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--task-runner") from None
        flow = _load_flow("colorize_archive", "colorize_archive_flow")
        state = flow(
            source=source,
            out=out,
            model=model,
            task_runner=task_runner,
            workers=workers,
            batch_size=batch_size,
            input_size=input_size,
            precision=precision,
            ab_upsample=ab_upsample,
            device=device,
            max_pixels=limit,
            torch_threads=torch_threads,
            return_state=True,
        )
        if not state.is_completed():
            typer.echo(f"Error: flow run {state.name}: {state.message}", err=True)
            raise typer.Exit(1)
        result = state.result()
        typer.echo(state.message)
        if result["failed"]:
            raise typer.Exit(1)
        return
    settings = archive.ColorizeSettings(input_size, ab_upsample, device, precision, limit, torch_threads)
    try:
        report = archive.colorize_archive(
            source, out, model, settings=settings, workers=workers, batch_size=batch_size, progress=True
        )
    except (archive.ArchiveError, FileNotFoundError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


@app.command("gc")
def gc_command(
    dest: Annotated[str, typer.Argument(metavar="DEST", help="Shard dataset (folder or s3:// prefix).")],
    grace_hours: float = typer.Option(
        24.0, "--grace-hours", min=0, help="Keep unlisted files younger than this (an ingest may be running)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
) -> None:
    """Remove orphan shards (left by crashed ingests; never read) and old hash-index files of a dataset."""
    from ddcolor.data.gc import collect_garbage

    report = collect_garbage(dest, grace_s=grace_hours * 3600, dry_run=dry_run)
    typer.echo(report.summary(dry_run))


# --- demo and pipeline ---------------------------------------------------------------------------------
def _flow_sections(overrides: list[str]) -> dict[str, dict]:
    """``["train.max_steps=50", "model.pretrained=null"]`` -> flow parameters ``{"train": {"max_steps": 50}, ...}``
    (values parsed as YAML, as `load_config` does; the flow validates them)."""
    import yaml

    sections: dict[str, dict] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            typer.echo(f"Error: override {item!r}: expected SECTION.KEY=VALUE, e.g. train.max_steps=50", err=True)
            raise typer.Exit(2)
        sections.setdefault(section, {})[name] = yaml.safe_load(raw) if raw.strip() else None
    return sections


def _load_flow(module: str = "train_ddcolor", name: str = "train_ddcolor"):
    """The flow ``name`` of flows/<module>.py in this checkout (not part of the installed package), on local Prefect.

    Without PREFECT_API_URL, Prefect runs a temporary local server on the SQLite database in PREFECT_HOME: it is
    kept in ./.prefect (git-ignored), so `PREFECT_HOME=.prefect prefect server start` shows these runs later.
    """
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "flows" / f"{module}.py").is_file():
        typer.echo(f"Error: no flows/{module}.py next to {root / 'ddcolor'}; run from a source checkout", err=True)
        raise typer.Exit(1)
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    from ddcolor._optional import require

    require("prefect", "mlops", f"the {module.replace('_', '-')} flow")
    import importlib

    return getattr(importlib.import_module(f"flows.{module}"), name)


def _pipeline(params: dict, no_prefect: bool, progress: bool):
    """Run the pipeline (flow, or `run_pipeline` with --no-prefect); the `PipelineResult`; exit 1 if it failed."""
    import json
    import os
    import sys

    from ddcolor.pipeline import PipelineResult, run_pipeline, section_overrides

    if not sys.stdout.isatty():  # MLflow's download bars are for people at a terminal, not for logs
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if no_prefect:
        keys = ("data", "validate", "model", "train", "eval", "gates", "registry")
        sections = {k: params[k] for k in keys if k in params}
        dotted = [f"{key}={json.dumps(value)}" for key, value in section_overrides(**sections).items()]
        cfg = _train_config(params["config_path"], dotted)
        result = run_pipeline(
            cfg,
            params["source"],
            work_dir=params["work_dir"],
            force=params["force"],
            progress=progress,
            colorize=params["colorize"],
            nproc_per_node=params["nproc_per_node"],
        )
    else:
        flow = _load_flow()
        state = flow(**params, return_state=True)
        if not state.is_completed():
            typer.echo(f"Error: flow run {state.name}: {state.message}", err=True)
            raise typer.Exit(1)
        result = PipelineResult(**state.result())  # the flow has logged its summary
    if no_prefect:
        typer.echo(result.summary())
    if result.status == "validation_failed":
        typer.echo(f"Error: {result.reason}", err=True)
        raise typer.Exit(1)
    return result


@app.command("pipeline")
def pipeline_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.max_steps=50 gates.max_fid=30."),
    ] = None,
    source: str | None = typer.Option(
        None, "--source", "-s", help="Raw images (folder or s3://). Default: data.source."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    work_dir: str = typer.Option(
        "runs/pipeline", "--work-dir", "-o", help="Reports, training runs and the sample grid go here."
    ),
    force: bool = typer.Option(False, "--force", help="Train even if the champion has the same data and config."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the steps in this process without Prefect."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="GPUs for torchrun DDP training."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes of a multi-node torchrun (c10d rendezvous)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank, 0 .. nnodes-1."),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST[:PORT] every node reaches (node 0; port 29400 by default)."
    ),
    rdzv_id: str | None = typer.Option(None, "--rdzv-id", help="Rendezvous id, the same on every node of a run."),
    colorize: bool = typer.Option(True, "--colorize/--no-colorize", help="Colorize the sample photos at the end."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars (--no-prefect only)."),
    ingest_task_runner: str | None = typer.Option(
        None,
        "--ingest-task-runner",
        help="Fan ingestion out as Prefect tasks on: thread, process, dask[://host:port], ray[://host:port] "
        "(not with --no-prefect). Default: a local process pool.",
    ),
) -> None:
    """Ingest -> validate -> train -> evaluate -> gate -> promote -> colorize, as the `train-ddcolor` Prefect flow.

    Skips training when the champion was trained on the same dataset version and config (unless --force). Exit code
    0 when the run completed (promoted, not promoted by the gates, or skipped), 1 when validation or a step failed,
    2 on a bad configuration. Without PREFECT_API_URL the flow runs on a local Prefect database in ./.prefect.
    """
    from pathlib import Path

    path = config if config is not None else ("params.yaml" if Path("params.yaml").is_file() else None)
    _train_config(path, overrides or [])  # a bad key is exit 2 before anything starts
    if ingest_task_runner is not None and no_prefect:
        typer.echo("Error: --ingest-task-runner needs the Prefect flow; drop --no-prefect", err=True)
        raise typer.Exit(2)
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
            typer.echo("Error: --nnodes/--rdzv-endpoint need the Prefect flow; drop --no-prefect", err=True)
            raise typer.Exit(2)
        try:
            Rendezvous(nnodes, node_rank, rdzv_endpoint)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--nnodes") from None
        params.update(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)
    _pipeline(params, no_prefect, progress)


@app.command("demo")
def demo_command(
    out: str = typer.Option("demo_out", "--out", "-o", help="Output folder (data/, runs/, samples/grid.png, ...)."),
    colorize_only: bool = typer.Option(
        False, "--colorize-only", help="Only colorize the sample photos (no training): gray/, color/, grid.png."
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Training steps (default: about 2 minutes on CPU)."),
    force: bool = typer.Option(False, "--force", help="Retrain even if data and config are unchanged."),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="Run the pipeline without Prefect."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="(--colorize-only) Release name, checkpoint or models:/ URI; default: ddcolor_paper_tiny if cached, else "
        "random-init atto (warned).",
    ),
    input_size: int = typer.Option(256, "--input-size", help="(--colorize-only) Network resolution, px (x32)."),
    device: Literal["auto", "cpu", "cuda", "mps"] = typer.Option(
        "auto", "--device", help="(--colorize-only) Where the network runs."
    ),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto",
        "--precision",
        help="Training precision (train.amp; fp32 = none), or with --colorize-only the network's: auto = bf16 on a "
        "GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else fp32.",
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="(--colorize-only) Force a random-init atto model (smoke test)."
    ),
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
    sections = params
    for warning in warnings:
        typer.echo(f"WARNING: {warning}", err=True)
    typer.echo(demo.estimate_message(demo.pipeline_demo_config(params)))
    write_samples(sections["data"]["source"], demo.PIPELINE_DEMO_IMAGES)
    result = _pipeline(params, no_prefect, progress=True)
    name = sections["registry"]["model_name"]
    tracking = EnvSettings.from_env().mlflow_tracking_uri
    ui = tracking  # a server: its runs table below; a local store: the command that serves it
    if not tracking.startswith("http"):
        ui = f"{_venv_command('mlflow')} ui --backend-store-uri {tracking}, then open http://127.0.0.1:5000/"
    experiment_id = _experiment_id(tracking, sections["registry"].get("experiment_name", name))
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
    if sections["model"].get("pretrained") is None or sections["eval"].get("metric_weights") == "random":
        typer.echo("  (trained and scored without pretrained weights: see the warnings above)", err=True)


def _require_tracking_server() -> None:
    """Fail in one line, at once, when MLFLOW_TRACKING_URI names an HTTP server that does not answer (MLflow's own
    client would retry for minutes before saying the same)."""
    from ddcolor.tracking import TrackingError
    from ddcolor.tracking import client as tracking_client

    uri = tracking_client.tracking_uri()
    if not tracking_client.is_http(uri):
        return
    problem = tracking_client.health_problem(uri, timeout=10)
    if problem:
        raise TrackingError(
            f"the MLflow server {tracking_client.redact(uri)} is not reachable ({problem}): start it, or point "
            "MLFLOW_TRACKING_URI at the right one"
        )


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
    from ddcolor import weights
    from ddcolor.demo import run_demo
    from ddcolor.model import CheckpointError

    if random_init and model is not None:
        raise typer.BadParameter("give either --model or --random-init, not both", param_hint="--model")
    try:
        result = run_demo(
            out, model=model, input_size=input_size, device=device, precision=precision, random_init=random_init
        )
    except (weights.WeightsError, FileNotFoundError, CheckpointError, ValueError) as err:
        raise _model_error(err) from None
    typer.echo(result.report.summary())
    typer.echo(f"model: {result.model}")
    typer.echo(f"grid: {result.grid}")
    if result.random_init:
        typer.echo(
            "WARNING: random-init model: the colors are meaningless. Fetch weights "
            "(`ddcolor weights fetch ddcolor_paper_tiny`) or train a model, then rerun (`--model NAME_OR_PATH`).",
            err=True,
        )


# --- export --------------------------------------------------------------------------------------------
@app.command("export-onnx")
def export_onnx_command(
    out: str = typer.Option(..., "--out", "-o", help="Output .onnx file."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Official release name (see `ddcolor weights list`), a .safetensors or official .pth checkpoint. "
        "Required unless --random-init.",
    ),
    preset: str | None = typer.Option(
        None, "--preset", help="Preset (atto|tiny|large) of an official .pth (inferred if absent) or for --random-init."
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Export a random-init model (atto unless --preset): for testing the toolchain."
    ),
    opset: int = typer.Option(18, "--opset", min=17, help="ONNX opset (>= 17; 18 is the exporter's own)."),
) -> None:
    """Export the fp32 inference network to ONNX: gray_rgb (B,3,H,W) -> ab (B,2,H,W), dynamic B/H/W (x32)."""
    from ddcolor._optional import require

    require("onnx", "onnx", "ONNX export")  # before torch and the model load: fail fast with the install hint
    from ddcolor import weights
    from ddcolor.export import export_onnx
    from ddcolor.model import CheckpointError, build_model
    from ddcolor.model.checkpoint import load_model

    if random_init == (model is not None):
        raise typer.BadParameter("give exactly one of --model or --random-init", param_hint="--model")
    try:
        if random_init:
            typer.echo(
                f"WARNING: exporting a random-init {preset or 'atto'} model: its colors are meaningless.", err=True
            )
            network = build_model(preset or "atto", pretrained=None).eval()
        else:
            network = load_model(model, preset=preset)
        path = export_onnx(network, out, opset=opset)
    except (weights.WeightsError, FileNotFoundError, CheckpointError, ValueError) as err:
        typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"exported: {path} (opset {opset}; input gray_rgb (B,3,H,W), H and W multiples of 32)")


# --- approve -------------------------------------------------------------------------------------------
@app.command("approve")
def approve_command(
    target: str = typer.Argument(
        ..., metavar="RUN_OR_VERSION", help="The paused train-ddcolor flow run id, or the registered version number."
    ),
    reject: bool = typer.Option(False, "--reject", help="Reject: the champion stays."),
    comment: str = typer.Option("", "--comment", "-m", help="Why (recorded on the version as approval.comment)."),
    by: str | None = typer.Option(None, "--by", help="Who answers (default: the login name)."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml (registry names). Default: ./params.yaml if present, else defaults."
    ),
) -> None:
    """Approve (or --reject) a challenger waiting for a person (gates.require_approval): resumes its paused flow run,
    or finishes a version held by a run without Prefect. Exit 1 when there is nothing to answer."""
    import getpass

    from ddcolor.approval import ApprovalError, answer

    cfg = _train_config(config, [])
    _require_tracking_server()
    try:
        line = answer(target, cfg, approve=not reject, comment=comment, approver=by or getpass.getuser())
    except ApprovalError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(line)


# --- automations ---------------------------------------------------------------------------------------
automations_app = typer.Typer(no_args_is_help=True, help="Prefect automations (notifications) kept in the repository.")
app.add_typer(automations_app, name="automations")


@automations_app.command("apply")
def automations_apply(
    file: str = typer.Option(
        "infra/prefect/automations.yaml", "--file", "-f", help="Automations file (Prefect automation schema)."
    ),
) -> None:
    """Create or update the notification block (URL from the variable the file names, e.g.
    DDCOLOR_NOTIFY_WEBHOOK_URL) and every automation of FILE, by name, on the server in PREFECT_API_URL."""
    from ddcolor.automations import AutomationsError, apply_automations

    try:
        names = apply_automations(file)
    except AutomationsError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(2) from None
    for name in names:
        typer.echo(f"automation applied: {name}")


# --- validate ------------------------------------------------------------------------------------------
@app.command("validate")
def validate_command(
    uri: str = typer.Argument(..., metavar="URI", help="Dataset folder or s3:// prefix holding manifest.json."),
    reference: str | None = typer.Option(
        None, "--reference", "-r", help="Another dataset version: per-image L/ab/colorfulness quantiles must match it."
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help="params.yaml whose data section (size, resize_mode, val_fraction, min_colorfulness) the dataset must "
        "match, and whose validate section gives the tolerances. Default: no data check (the manifest's own config "
        "is the expectation); tolerances from ./params.yaml if present, else built-in defaults.",
    ),
    report: bool = typer.Option(
        True, "--report/--no-report", help="Write validation_report.md and validation.json next to the data."
    ),
    report_dir: str | None = typer.Option(
        None, "--report-dir", help="Write the reports to this folder or s3:// prefix instead of next to the data."
    ),
    split_tolerance: float | None = typer.Option(
        None,
        "--split-tolerance",
        min=0.0,
        help="Allowed |val share - val_fraction| beyond sampling noise (overrides validate.split_abs).",
    ),
    max_low_share: float | None = typer.Option(
        None,
        "--max-low-share",
        min=0.0,
        max=1.0,
        help="Largest allowed share of low-colorfulness rows (overrides validate.max_low_colorfulness_share).",
    ),
    drift_tol: Annotated[
        list[str] | None,
        typer.Option(
            "--drift-tol",
            metavar="COLUMN=VALUE",
            help="Absolute drift tolerance, e.g. L_mean=3 (repeatable; overrides validate.drift_abs.COLUMN).",
        ),
    ] = None,
    json_out: bool = _json_option(),
) -> None:
    """Validate a shard dataset (manifest, checksums, Great Expectations suite, drift); exit 1 on failure.

    Tolerances: the validate section of the config, then the flags above (exit 2 on a bad value, naming the key)."""
    from pathlib import Path

    from ddcolor.config import ConfigError, load_config
    from ddcolor.data.validate import Tolerances, validate_dataset

    overrides: dict = {}
    if split_tolerance is not None:
        overrides["validate.split_abs"] = split_tolerance
    if max_low_share is not None:
        overrides["validate.max_low_colorfulness_share"] = max_low_share
    drift = dict(item.partition("=")[::2] for item in drift_tol or [])
    path = config if config is not None else ("params.yaml" if Path("params.yaml").is_file() else None)
    try:
        cfg = load_config(path)
        if drift:  # merged onto the file's columns (a dotted key cannot reach into a mapping)
            overrides["validate.drift_abs"] = {**cfg.validate.drift_abs, **drift}
        cfg = cfg.with_overrides(overrides)
    except ConfigError as err:
        flags = " (--split-tolerance, --max-low-share, --drift-tol set these validate.* keys)" if overrides else ""
        typer.echo(f"Error: {err}{flags}", err=True)
        raise typer.Exit(2) from None
    expected = cfg.data if config is not None else None
    result = validate_dataset(
        uri, reference=reference, expected=expected, tolerances=Tolerances.from_config(cfg.validate)
    )
    _say(result.summary(), json_out)
    reports: list[str] = []
    if report:
        from ddcolor.data.validate import write_reports
        from ddcolor.storage import StorageError

        try:
            for written in write_reports(result, report_dir):
                reports.append(str(written))
                _say(f"report: {written}", json_out)
        except (OSError, StorageError) as err:
            typer.echo(f"WARNING: could not write the report: {err}", err=True)
    if json_out:
        _print_json({**result.to_dict(), "reports": reports})
    if not result.success:
        raise typer.Exit(1)


# --- ingest --------------------------------------------------------------------------------------------
@app.command("ingest")
def ingest_command(
    source: str = typer.Argument(..., metavar="SOURCE", help="Raw images: a local folder or s3://bucket/prefix."),
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides, e.g. data.size=64 data.shard_rows=512."),
    ] = None,
    dest: str | None = typer.Option(
        None, "--dest", "-d", help="Dataset: a local folder or s3://bucket/prefix. Default: data.shards_uri."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    workers: int | None = typer.Option(
        None,
        "--workers",
        "-j",
        min=0,
        help="Worker processes; 0 = in-process. Default: data.num_workers if the config sets it, else all cores.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Decode, resize and Lab-encode images into Parquet shards (incremental, deduplicated, bad files quarantined).

    Exit code 0 when the run completed (quarantined files are listed), 1 on a storage or dataset failure, 2 on a
    bad configuration.
    """
    from pathlib import Path

    from ddcolor.config import ConfigError, load_config
    from ddcolor.data.ingest import IngestError, ingest
    from ddcolor.storage import StorageError

    try:
        path = config if config is not None else ("params.yaml" if Path("params.yaml").is_file() else None)
        cfg = load_config(path, overrides=overrides or [])
    except ConfigError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(2) from None
    try:
        report = ingest(source, dest, cfg, num_workers=workers, progress=progress)
    except (StorageError, IngestError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())


# --- samples -------------------------------------------------------------------------------------------
@app.command("samples")
def samples_command(
    out: str = typer.Option(..., "--out", "-o", help="Folder or s3://bucket/prefix to write the JPEG files into."),
    count: int = typer.Option(48, "--count", "-n", min=1, help="Number of images (photos first, then variants)."),
) -> None:
    """Write the built-in sample images: scikit-image photos plus deterministic crops/flips/rescales (offline).

    The same --count always gives the same bytes (stable DVC hashes). Earlier sample files that this run does not
    write are removed; other files are left alone.
    """
    from ddcolor.data.samples import write_samples
    from ddcolor.storage import StorageError

    try:
        written = write_samples(out, count)
    except (StorageError, RuntimeError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {len(written)} sample images to {out}")


# --- train ---------------------------------------------------------------------------------------------
#: `ddcolor finetune`: the packaged ``finetune`` recipe (ddcolor/configs/finetune.yaml), applied before the user's
#: KEY=VALUE overrides (which win), then the batch layout of this machine: effective batch 16 on one GPU as
#: micro-batch 4 x 4 accumulation steps (the official per-GPU batch); 4 = 2 x 2 on CPU.
FINETUNE_DEFAULTS_GPU = ("train.batch_size=16", "train.grad_accum_steps=4")
FINETUNE_DEFAULTS_CPU = ("train.batch_size=4", "train.grad_accum_steps=2")


def _train_config(config: str | None, overrides: list[str], defaults: tuple[str, ...] = ()):
    """params.yaml (or --config, or built-in defaults) with `defaults` then `overrides` applied; exit 2 if bad."""
    from pathlib import Path

    from ddcolor.config import ConfigError, load_config

    try:
        path = config if config is not None else ("params.yaml" if Path("params.yaml").is_file() else None)
        return load_config(path, overrides=[*defaults, *overrides])
    except ConfigError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(2) from None


def _run_training(cfg, data: str, out: str, init: str | None, resume: bool, track: bool, run_name: str | None, **kw):
    """Start the tracker (rank 0), train, finish the tracker; training errors exit 1 with their message.

    SIGTERM / SIGINT stop after the current step and a checkpoint: exit 143 / 130 with "stopped at step N; ...".
    """
    import os

    from ddcolor.data.loader import ShardError
    from ddcolor.model import CheckpointError
    from ddcolor.storage import StorageError
    from ddcolor.tracking import TrackingError, start_tracker
    from ddcolor.train import TrainingDivergedError, TrainingStopped, train
    from ddcolor.train.checkpoint import CheckpointWriteError
    from ddcolor.weights import WeightsError

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        tracker = start_tracker(cfg, enabled=track and main_rank, run_name=run_name)
    except TrackingError as err:
        typer.echo(f"Error: {err} (or pass --no-track)", err=True)
        raise typer.Exit(1) from None
    status = "FAILED"
    try:
        result = train(cfg, data, out_dir=out, init=init, resume=resume, tracker=tracker, **kw)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except TrainingStopped as stop:
        status = "KILLED"
        if main_rank:
            typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_code) from None
    except (
        TrainingDivergedError,
        CheckpointWriteError,
        ValueError,
        FileNotFoundError,
        WeightsError,
        CheckpointError,
        StorageError,
        ShardError,
    ) as err:
        typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))}", err=True)
        raise typer.Exit(1) from None
    finally:
        tracker.finish(status)
    if main_rank:
        typer.echo(
            f"trained {result.steps} steps; losses: "
            + ", ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items())
        )
        typer.echo(f"model: {result.checkpoint_path}")
        typer.echo(f"checkpoint: {result.checkpoint_dir} (continue with --resume)")
        if result.run_id:
            typer.echo(f"MLflow run: {result.run_id}" + (f"; model: {result.model_uri}" if result.model_uri else ""))
    return result


@app.command("train")
def train_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.lr=3e-4 train.max_steps=1000."),
    ] = None,
    data: str | None = typer.Option(
        None, "--data", "-d", help="Shard dataset: folder or s3:// prefix with manifest.json. Default: data.shards_uri."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    out: str = typer.Option(
        "runs/train", "--out", "-o", help="Output folder: model.safetensors, metrics.jsonl, checkpoints/."
    ),
    init: str | None = typer.Option(
        None,
        "--init",
        help="Start G from official:NAME (ddcolor_paper_tiny, ...; see `ddcolor weights list`), a .safetensors or "
        "an official .pth file, instead of the model section.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from the newest intact checkpoint under --out (a damaged newer one is skipped with a warning).",
    ),
    resume_strict: bool = typer.Option(
        False, "--resume-strict", help="Like --resume, but fail when the newest checkpoint is damaged."
    ),
    track: bool = typer.Option(True, "--track/--no-track", help="Log to MLflow (MLFLOW_TRACKING_URI)."),
    run_name: str | None = typer.Option(None, "--run-name", help="MLflow run name."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    result_json: str | None = typer.Option(
        None,
        "--result-json",
        help="Write the result (model path, steps, final losses, MLflow run id and model URI, checkpoint) as JSON "
        "here at the end (rank 0); the pipeline's torchrun path reads it.",
    ),
) -> None:
    """Train DDColor (generator + discriminator) on a shard dataset. Multi-GPU: `torchrun ... -m ddcolor.cli train`.

    Exit code 0 when training finished, 1 on a training failure (divergence, damaged checkpoints, a checkpoint that
    could not be written, data, weights, tracking server), 2 on a bad configuration, 143 / 130 when SIGTERM / SIGINT
    stopped it (after finishing the current step and writing a checkpoint; a second signal exits at once).
    """
    import os

    cfg = _train_config(config, overrides or [])
    result = _run_training(
        cfg,
        data or cfg.data.shards_uri,
        out,
        init,
        resume or resume_strict,
        track,
        run_name,
        progress=progress,
        resume_strict=resume_strict,
    )
    if result_json and os.environ.get("RANK", "0") == "0":  # every rank returns the result; rank 0 writes it
        from dataclasses import asdict

        from ddcolor.storage import write_json

        write_json(result_json, asdict(result))


@app.command("finetune")
def finetune_command(
    source: str = typer.Argument(..., metavar="FOLDER_OR_S3_PREFIX", help="Your color images (recursively)."),
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides, e.g. train.max_steps=500 data.size=256."),
    ] = None,
    init: str = typer.Option(
        "official:ddcolor_modelscope",
        "--init",
        help="Starting generator: official:NAME (fetch it first: `ddcolor weights fetch NAME`), .safetensors or .pth.",
    ),
    out: str = typer.Option("runs/finetune", "--out", "-o", help="Output folder (data/, model.safetensors, ...)."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted fine-tune in --out."),
    track: bool = typer.Option(True, "--track/--no-track", help="Log to MLflow (MLFLOW_TRACKING_URI)."),
    run_name: str | None = typer.Option(None, "--run-name", help="MLflow run name."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Fine-tune a released model on your images: ingest into OUT/data, validate, train, print where the model is.

    Defaults (override with KEY=VALUE): 2000 steps, lr 1e-5 (decayed at 1000, 1500), effective batch 16 = 4 x 4
    accumulation on a GPU (4 = 2 x 2 on CPU).
    """
    import json

    import torch

    from ddcolor.data.ingest import IngestError, ingest
    from ddcolor.data.validate import Tolerances, validate_dataset, write_reports
    from ddcolor.recipes import recipe_overrides
    from ddcolor.storage import StorageError, join

    recipe = tuple(f"{key}={json.dumps(value)}" for key, value in recipe_overrides("finetune").items())
    hardware = FINETUNE_DEFAULTS_GPU if torch.cuda.is_available() else FINETUNE_DEFAULTS_CPU
    cfg = _train_config(config, overrides or [], defaults=(*recipe, *hardware))
    dataset = join(out, "data")
    try:
        report = ingest(source, dataset, cfg, progress=progress)
    except (StorageError, IngestError) as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(report.summary())
    result = validate_dataset(dataset, expected=cfg.data, tolerances=Tolerances.from_config(cfg.validate))
    typer.echo(result.summary())
    if not result.success:
        for written in write_reports(result):
            typer.echo(f"report: {written}")
        typer.echo("Error: the dataset failed validation (see the report above); fix the images and rerun", err=True)
        raise typer.Exit(1)
    trained = _run_training(cfg, dataset, out, init, resume, track, run_name, progress=progress)
    typer.echo(f"colorize with: ddcolor colorize --model {trained.checkpoint_path} IMAGES -o OUTPUT_FOLDER")


# --- evaluate ------------------------------------------------------------------------------------------
@app.command("evaluate")
def evaluate_command(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(metavar="[KEY=VALUE]...", help="Config overrides, e.g. eval.max_images=500 eval.batch_size=16."),
    ] = None,
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="Official release name (see `ddcolor weights list`), a .safetensors or an official .pth checkpoint.",
    ),
    data: str | None = typer.Option(
        None, "--data", "-d", help="Shard dataset (folder or s3:// prefix); its val split. Default: data.shards_uri."
    ),
    out: str = typer.Option("runs/eval", "--out", "-o", help="Output folder: metrics.json, report.md, samples.png."),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    random_init_metrics: bool = typer.Option(
        False,
        "--random-init-metrics",
        help="Random-init Inception/AlexNet for FID/LPIPS: smoke tests only, MEANINGLESS FID and LPIPS.",
    ),
    track: bool = typer.Option(True, "--track/--no-track", help="Log metrics to MLflow (MLFLOW_TRACKING_URI)."),
    run_name: str | None = typer.Option("evaluate", "--run-name", help="MLflow run name."),
    run_id: str | None = typer.Option(
        None,
        "--run-id",
        help="Log into this existing MLflow run instead of a new one; 'model' = the training run recorded in the "
        "checkpoint (so `ddcolor gate/promote --run-id` see the val/* metrics on the run that made the model).",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if available)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto",
        "--precision",
        help="Network precision: auto = bf16 on a GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else "
        "fp32. Metric networks: fp32.",
    ),
    json_out: bool = _json_option(),
) -> None:
    """Evaluate a model on a dataset's val split: FID, colorfulness, ΔCF, PSNR, LPIPS -> metrics.json + report.md."""
    from ddcolor import weights
    from ddcolor.data.loader import ShardError
    from ddcolor.devices import resolve_device
    from ddcolor.evaluate import evaluate
    from ddcolor.model import CheckpointError
    from ddcolor.model.checkpoint import checkpoint_run_id, load_model
    from ddcolor.storage import StorageError
    from ddcolor.tracking import TrackingError, start_tracker

    cfg = _train_config(config, overrides or [])
    try:
        network = load_model(model)
    except (weights.WeightsError, FileNotFoundError, CheckpointError, ValueError) as err:
        raise _model_error(err) from None
    if run_id == "model":
        run_id = checkpoint_run_id(model)
        if run_id is None:
            typer.echo(f"Error: {model} records no MLflow run (trained without tracking?); give --run-id ID", err=True)
            raise typer.Exit(1)
    random_init_metrics = random_init_metrics or cfg.eval.metric_weights == "random"
    if random_init_metrics:
        typer.echo(
            "WARNING: --random-init-metrics: FID and LPIPS use RANDOM Inception/AlexNet networks; their values are "
            "MEANINGLESS (smoke test only)",
            err=True,
        )
    try:
        tracker = start_tracker(cfg, enabled=track, run_name=run_name, run_id=run_id)
    except TrackingError as err:
        typer.echo(f"Error: {err} (or pass --no-track)", err=True)
        raise typer.Exit(1) from None
    status = "FAILED"
    try:
        result = evaluate(
            network.to(resolve_device(device or "auto")),
            data or cfg.data.shards_uri,
            cfg,
            pretrained=None if random_init_metrics else "cache",
            tracker=tracker,
            out_dir=out,
            progress=progress,
            precision=precision,
        )
        status = "FINISHED"
    except weights.WeightsError as err:
        typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))} (or --random-init-metrics for a smoke test)", err=True)
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError, StorageError, ShardError) as err:
        typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))}", err=True)
        raise typer.Exit(1) from None
    finally:
        tracker.finish(status)
    _say(f"{result.n_images} images: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()), json_out)
    _say(f"report: {out}/report.md", json_out)
    if json_out:
        _print_json(
            {
                "n_images": result.n_images,
                "metrics": result.metrics,
                "protocol": result.protocol,
                "out_dir": str(out),
                "report": f"{out}/report.md",
            }
        )


# --- registry ------------------------------------------------------------------------------------------
def _registry_fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"Error: {str(exc).strip(chr(39) + chr(34))}", err=True)
    return typer.Exit(1)


def _run_id_of(run_id: str | None, model: str | None) -> str:
    """`--run-id` as given, or the training run recorded in the `--model` checkpoint; exit 1/2 when unusable."""
    from ddcolor.model.checkpoint import checkpoint_run_id

    if (run_id is None) == (model is None):
        typer.echo("Error: give exactly one of --run-id ID or --model PATH", err=True)
        raise typer.Exit(2)
    if run_id is not None:
        return run_id
    found = checkpoint_run_id(model)
    if found is None:
        typer.echo(
            f"Error: {model} records no MLflow run (missing, not a .safetensors checkpoint of ours, or trained with "
            "--no-track); give --run-id ID",
            err=True,
        )
        raise typer.Exit(1)
    return found


@app.command("gate")
def gate_command(
    run_id: str | None = typer.Option(None, "--run-id", help="MLflow run whose model is the challenger."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Or: a trained .safetensors checkpoint; gate the MLflow run recorded in it."
    ),
    metrics: str | None = typer.Option(
        None, "--metrics", help="metrics.json from `ddcolor evaluate` (default: the run's val/* metrics)."
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    json_out: bool = _json_option(),
) -> None:
    """Check a run's eval metrics against the gates and the champion; log the decision to the run; exit 1 on fail."""
    import json
    from pathlib import Path

    from ddcolor._optional import require

    require("mlflow", "mlops", "the model registry")
    from mlflow.exceptions import MlflowException

    from ddcolor.registry import RegistryError, gate_run

    cfg = _train_config(config, [])
    _require_tracking_server()
    run_id = _run_id_of(run_id, model)
    try:
        values = json.loads(Path(metrics).read_text()) if metrics else None
        decision = gate_run(run_id, cfg, metrics=values)
    except (OSError, ValueError, RegistryError, MlflowException) as err:
        raise _registry_fail(err) from None
    _say(decision.table(), json_out)
    if json_out:
        _print_json({**decision.to_dict(), "run_id": run_id})
    if not decision.passed:
        raise typer.Exit(1)


def _write_promotion(path: str, record: dict, json_out: bool = False) -> None:
    """Write the promotion record as JSON (atomically: a reader never sees half a file)."""
    from ddcolor import storage

    storage.write_json(path, record)
    _say(f"decision: {path}", json_out)


@app.command("promote")
def promote_command(
    run_id: str | None = typer.Option(None, "--run-id", help="Register this run's model, gate it, promote it."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Or: a trained .safetensors checkpoint; promote the MLflow run recorded in it (its .json sidecar).",
    ),
    do_rollback: bool = typer.Option(
        False, "--rollback", help="Move the champion back to its previous_champion instead."
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Also write the outcome as JSON: decision (promoted|already_champion|rejected|rolled_back), promoted, "
        "gate_passed, version, champion, previous_champion, run_id, checks (for `dvc metrics show`).",
    ),
    fail_on_reject: bool = typer.Option(
        True,
        "--fail-on-reject/--no-fail-on-reject",
        help="Exit 1 when the gate rejects the challenger (default); --no-fail-on-reject exits 0 (the rejection is "
        "a result, recorded by --out: pipelines such as `dvc repro`).",
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    json_out: bool = _json_option(),
) -> None:
    """Register a run's model (alias challenger), gate its val/* metrics, move the champion alias if it passed."""
    from ddcolor._optional import require

    require("mlflow", "mlops", "the model registry")
    from mlflow.exceptions import MlflowException

    from ddcolor.pipeline import promotion_record
    from ddcolor.registry import RegistryError, gate_run, promote, register, rollback

    if do_rollback and (run_id is not None or model is not None):
        typer.echo("Error: give exactly one of --run-id ID, --model PATH or --rollback", err=True)
        raise typer.Exit(2)
    cfg = _train_config(config, [])
    _require_tracking_server()
    name, alias = cfg.registry.model_name, cfg.registry.champion_alias
    if do_rollback:
        try:
            result = rollback(cfg)
        except (RegistryError, MlflowException) as err:
            raise _registry_fail(err) from None
        _say(f"rolled back {name}@{alias}: version {result.previous_champion} -> {result.champion}", json_out)
        record = {"decision": "rolled_back", "promoted": True, "model_name": name, "version": result.version}
        record.update(champion=result.champion, previous_champion=result.previous_champion)
        if out:
            _write_promotion(out, record, json_out)
        if json_out:
            _print_json(record)
        return
    run_id = _run_id_of(run_id, model)
    try:
        decision = gate_run(run_id, cfg)
        version = register(run_id, None, cfg)
        result = promote(version, decision, cfg)
    except (RegistryError, MlflowException) as err:
        raise _registry_fail(err) from None
    _say(decision.table(), json_out)
    record, line = promotion_record(cfg, run_id, version, decision, result)
    _say(line, json_out)
    if out:
        _write_promotion(out, record, json_out)
    if json_out:
        _print_json(record)
    if record["decision"] == "rejected" and fail_on_reject:
        raise typer.Exit(1)


# --- ui ------------------------------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("ui")
def ui_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback exposes the page."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="TCP port."),
    auth_token: str | None = typer.Option(
        None,
        "--auth-token",
        envvar="DDCOLOR_UI_TOKEN",
        help="Require this token (HTTP basic-auth password, any user name, or 'Authorization: Bearer TOKEN').",
    ),
    checkpoint: Annotated[
        list[str] | None,
        typer.Option("--checkpoint", metavar="PATH", help="Checkpoint file or folder to offer (repeatable)."),
    ] = None,
    allow_paths: bool | None = typer.Option(
        None,
        "--allow-paths/--no-allow-paths",
        help="Let the page load any checkpoint path typed into it. Default: only when bound to loopback.",
    ),
    config: str | None = typer.Option(
        None, "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
    input_size: int = typer.Option(512, "--input-size", help="Preselected network resolution, px (multiple of 32)."),
    device: Literal["auto", "cpu", "cuda", "mps"] = typer.Option("auto", "--device", help="Where the networks run."),
    precision: Literal["auto", "fp32", "bf16", "fp16"] = typer.Option(
        "auto",
        "--precision",
        help="Network precision: auto = bf16 on a GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else fp32.",
    ),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest accepted file, MB."),
    max_files: int = typer.Option(16, "--max-files", min=1, help="Most files per request."),
    cache_size: int = typer.Option(3, "--cache-size", min=1, help="Loaded (model, input size) pairs kept in memory."),
    registered_model: str | None = typer.Option(
        None,
        "--registered-model",
        help="MLflow registered model to offer (champion, challenger, versions). Default: registry.model_name.",
    ),
) -> None:
    """Start the web playground: colorize uploads with any registered version, release or checkpoint; compare them."""
    from ddcolor._optional import require

    uvicorn = require("uvicorn", "ui", "the playground")
    require("fastapi", "ui", "the playground")
    from ddcolor.ui import UiSettings, create_app
    from ddcolor.ui.app import MB

    cfg = _train_config(config, [f"registry.model_name={registered_model}"] if registered_model else [])
    loopback = _is_loopback(host)
    sizes = tuple(sorted({256, 512, 768, 1024, input_size}))
    settings = UiSettings(
        max_upload_bytes=int(max_upload_mb * MB),
        max_files=max_files,
        input_sizes=sizes,
        default_input_size=input_size,
        max_pixels=cfg.data.max_image_pixels,
        auth_token=auth_token or None,
    )
    try:
        web = create_app(
            cfg,
            checkpoints=checkpoint or [],
            allow_any_path=loopback if allow_paths is None else allow_paths,
            device=device,
            precision=precision,
            cache_size=cache_size,
            settings=settings,
        )
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))}", err=True)
        raise typer.Exit(2) from None
    if not loopback and not auth_token:
        bar = "!" * 100
        typer.echo(
            f"\n{bar}\nWARNING: ddcolor ui binds to {host} WITHOUT a token: anyone who can reach port {port} can run "
            f"the models.\nPass --auth-token TOKEN (or set DDCOLOR_UI_TOKEN), or bind to 127.0.0.1.\n{bar}",
            err=True,
        )
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"DDColor playground: http://{shown}:{port}/  (Ctrl+C stops it)")
    uvicorn.run(web, host=host, port=port, log_level="info")


def _print_version(value: bool) -> None:
    if value:
        from ddcolor import __version__

        typer.echo(f"ddcolor {__version__}")
        raise typer.Exit()


def _load_dotenv() -> None:
    """Load ./.env (the nearest one, searching up from the working directory) into the environment, as
    `.env.example` describes; variables already set win. Set DDCOLOR_NO_DOTENV=1 to skip it."""
    import os

    if os.environ.get("DDCOLOR_NO_DOTENV", "").strip() not in ("", "0"):
        return
    from dotenv import find_dotenv, load_dotenv

    path = find_dotenv(usecwd=True)
    if path:
        load_dotenv(path, override=False)
        logging.getLogger(__name__).debug("loaded %s", path)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging, and the traceback of an error."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _load_dotenv()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    app()
