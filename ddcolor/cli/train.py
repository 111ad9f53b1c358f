"""``ddcolor train`` and ``finetune``: training a generator (`ddcolor.train`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from ddcolor.cli._common import (
    ConfigOpt,
    ProgressOpt,
    RunNameOpt,
    TrackOpt,
    fail,
    load_params,
    overrides_argument,
)

if TYPE_CHECKING:
    from ddcolor.train import TrainResult

#: `ddcolor finetune`: the packaged ``finetune`` recipe (ddcolor/configs/finetune.yaml), applied before the user's
#: KEY=VALUE overrides (which win), then the batch layout of this machine: effective batch 16 on one GPU as
#: micro-batch 4 x 4 accumulation steps (the official per-GPU batch); 4 = 2 x 2 on CPU.
FINETUNE_DEFAULTS_GPU = ("train.batch_size=16", "train.grad_accum_steps=4")
FINETUNE_DEFAULTS_CPU = ("train.batch_size=4", "train.grad_accum_steps=2")


def _is_main_rank() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that tracks, prints and writes results."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def _training_exits() -> Iterator[None]:
    """The exit of a training that fails: 1 with the message (a tracking server also suggests --no-track), or
    143 / 130 when SIGTERM / SIGINT stopped it after the current step and a checkpoint ("stopped at step N; ...").
    Other library errors (divergence, damaged checkpoints, storage) reach the CLI's group."""
    from ddcolor.tracking import TrackingError
    from ddcolor.train import TrainingStopped

    try:
        yield
    except TrackingError as err:
        raise fail(f"{err} (or pass --no-track)") from None
    except TrainingStopped as stop:
        if _is_main_rank():
            typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_code) from None
    except (ValueError, FileNotFoundError) as err:  # bad settings or files
        raise fail(err) from None


def _print_result(result: TrainResult) -> None:
    """Where the model is (rank 0): losses, model file, checkpoint folder, MLflow run."""
    if not _is_main_rank():
        return
    losses = ", ".join(f"{k} {v:.4f}" for k, v in result.final_losses.items())
    typer.echo(f"trained {result.steps} steps; losses: {losses}")
    typer.echo(f"model: {result.checkpoint_path}")
    typer.echo(f"checkpoint: {result.checkpoint_dir} (continue with --resume)")
    if result.run_id:
        typer.echo(f"MLflow run: {result.run_id}" + (f"; model: {result.model_uri}" if result.model_uri else ""))


def train_command(
    overrides: Annotated[list[str] | None, overrides_argument("train.lr=3e-4 train.max_steps=1000")] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Shard dataset: folder or s3:// prefix with manifest.json. Default: data.shards_uri.",
        ),
    ] = None,
    config: ConfigOpt = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder: model.safetensors, metrics.jsonl, checkpoints/.")
    ] = "runs/train",
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start G from official:NAME (ddcolor_paper_tiny, ...; see `ddcolor weights list`), a .safetensors "
            "or an official .pth file, instead of the model section.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue from the newest intact checkpoint under --out (a damaged newer one is skipped with a "
            "warning).",
        ),
    ] = False,
    resume_strict: Annotated[
        bool, typer.Option("--resume-strict", help="Like --resume, but fail when the newest checkpoint is damaged.")
    ] = False,
    track: TrackOpt = True,
    run_name: RunNameOpt = None,
    progress: ProgressOpt = True,
    result_json: Annotated[
        str | None,
        typer.Option(
            "--result-json",
            help="Write the result (model path, steps, final losses, MLflow run id and model URI, checkpoint) as "
            "JSON here at the end (rank 0); the pipeline's torchrun path reads it.",
        ),
    ] = None,
) -> None:
    """Train DDColor (generator + discriminator) on a shard dataset. Multi-GPU: `torchrun ... -m ddcolor.cli train`.

    Exit code 0 when training finished, 1 on a training failure (divergence, damaged checkpoints, a checkpoint that
    could not be written, data, weights, tracking server), 2 on a bad configuration, 143 / 130 when SIGTERM / SIGINT
    stopped it (after finishing the current step and writing a checkpoint; a second signal exits at once).
    """
    from ddcolor.pipeline import train_step

    cfg = load_params(config, overrides or [])
    with _training_exits():
        result = train_step(
            cfg, data or cfg.data.shards_uri, out_dir=out, init=init, resume=resume, resume_strict=resume_strict,
            track=track, run_name=run_name, progress=progress,
        )  # fmt: skip
    _print_result(result)
    if result_json and _is_main_rank():  # every rank returns the result; rank 0 writes it
        from dataclasses import asdict

        from ddcolor.storage import write_json

        write_json(result_json, asdict(result))


def finetune_command(
    source: Annotated[str, typer.Argument(metavar="FOLDER_OR_S3_PREFIX", help="Your color images (recursively).")],
    overrides: Annotated[list[str] | None, overrides_argument("train.max_steps=500 data.size=256")] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="Starting generator: official:NAME (fetch it first: `ddcolor weights fetch NAME`), .safetensors or "
            ".pth.",
        ),
    ] = "official:ddcolor_modelscope",
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder (data/, model.safetensors, ...).")
    ] = "runs/finetune",
    config: ConfigOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted fine-tune in --out.")] = False,
    track: TrackOpt = True,
    run_name: RunNameOpt = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Fine-tune a released model on your images: ingest into OUT/data, validate, train, print where the model is.

    Defaults (override with KEY=VALUE): 2000 steps, lr 1e-5 (decayed at 1000, 1500), effective batch 16 = 4 x 4
    accumulation on a GPU (4 = 2 x 2 on CPU).
    """
    import json

    import torch

    from ddcolor.pipeline import ValidationFailed, finetune_step
    from ddcolor.recipes import recipe_overrides

    recipe = [f"{key}={json.dumps(value)}" for key, value in recipe_overrides("finetune").items()]
    hardware = FINETUNE_DEFAULTS_GPU if torch.cuda.is_available() else FINETUNE_DEFAULTS_CPU
    cfg = load_params(config, [*recipe, *hardware, *(overrides or [])])
    try:
        with _training_exits():
            trained = finetune_step(
                cfg, source, out_dir=out, init=init, resume=resume, track=track, run_name=run_name,
                progress=progress, on_summary=typer.echo,
            )  # fmt: skip
    except ValidationFailed as err:  # every check, then the error line naming the report
        typer.echo(err.result.summary())
        raise fail(err) from None
    _print_result(trained)
    typer.echo(f"colorize with: ddcolor colorize --model {trained.checkpoint_path} IMAGES -o OUTPUT_FOLDER")
