"""``ddcolor colorize``, ``colorize-archive`` and ``export-onnx``: running a trained network on files."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import typer

from ddcolor.cli._common import (
    AbUpsampleOpt,
    DeviceOpt,
    InputSizeOpt,
    PrecisionOpt,
    PresetOpt,
    fail,
    load_flow,
    model_error,
)

log = logging.getLogger(__name__)


def colorize_command(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="INPUT", help="Image or video files, folders (searched recursively) or quoted glob patterns."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Output folder; or an output file name (out.png, out.mp4) for a single input."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Official release name (ddcolor_paper_tiny, ddcolor_paper, ddcolor_modelscope, ddcolor_artistic; "
            "see `ddcolor weights list`), a .safetensors or official .pth checkpoint, or models:/NAME@ALIAS "
            "(once the registry exists). Required unless --random-init.",
        ),
    ] = None,
    preset: PresetOpt = None,
    input_size: InputSizeOpt = 512,
    ab_upsample: AbUpsampleOpt = "bilinear",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 1,
    fmt: Annotated[
        str | None, typer.Option("--format", help="Output format png|jpg|webp|tif|bmp; default: the input's.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing outputs (inputs are never replaced).")
    ] = False,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels",
            min=0,
            help="Skip images with more pixels (decompression-bomb guard); 0 = no limit. "
            "Default: data.max_image_pixels of params.yaml (89,478,485).",
        ),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init", help="Use a random-init model (atto unless --preset): smoke tests, MEANINGLESS colors."
        ),
    ] = False,
    engine: Annotated[
        Literal["torch", "onnx"],
        typer.Option("--engine", help="torch, or onnx (onnxruntime; --model may be an .onnx file from export-onnx)."),
    ] = "torch",
    crf: Annotated[
        int,
        typer.Option("--crf", min=0, max=51, help="(video) H.264 quality: 0 lossless .. 51; 18 ~ visually lossless."),
    ] = 18,
    temporal: Annotated[
        Literal["flow", "off"],
        typer.Option(
            "--temporal", help="(video) flow: stabilise colors over time (optical flow); off: plain per-frame."
        ),
    ] = "flow",
    temporal_strength: Annotated[
        float,
        typer.Option(
            "--temporal-strength",
            min=0.0,
            max=1.0,
            help="(video) Weight of the propagated color where motion is reliable.",
        ),
    ] = 0.8,
    segment_frames: Annotated[
        int,
        typer.Option(
            "--segment-frames", min=1, help="(video) Frames per resumable segment (a re-run reuses finished ones)."
        ),
    ] = 300,
) -> None:
    """Colorize images and videos: files, folders (recursive) or globs, written to -o.

    Images keep their format and metadata. Videos (.mp4, .mkv, .mov, ...; -o out.mkv picks the container) keep
    timestamps, rotation, audio and subtitles; they are encoded H.264 at --crf, stabilised over time unless
    --temporal off, and resume from finished segments when re-run after an interruption.
    """
    from ddcolor import colorize
    from ddcolor._optional import MissingExtraError
    from ddcolor.imageio import default_max_pixels
    from ddcolor.model import OFFICIAL_RELEASES

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
    except (FileNotFoundError, ValueError) as err:  # also a damaged checkpoint or missing weights file
        raise model_error(err) from None
    limit = default_max_pixels() if max_pixels is None else (max_pixels or None)
    try:
        try:
            from ddcolor import video
        except MissingExtraError as err:  # images still work without the video extra
            log.info("videos are not supported here: %s", err)
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
    except ValueError as err:  # bad inputs or output name: a usage error
        raise fail(err, 2) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


def colorize_archive_command(
    source: Annotated[str, typer.Argument(metavar="SRC", help="Folder or s3://bucket/prefix of images (recursive).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder or s3:// prefix (same relative paths).")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="models:/NAME@ALIAS (pinned to its version for the run), a checkpoint or a release.",
        ),
    ],
    task_runner: Annotated[
        str | None,
        typer.Option(
            "--task-runner",
            help="Run as the colorize-archive Prefect flow on: process, dask[://host:port], ray[://host:port]. "
            "Default: a local process pool, without Prefect.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=0, help="Processes (local pool / process runner / temporary dask); default: cores."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Files per task.")] = 8,
    input_size: InputSizeOpt = 512,
    ab_upsample: AbUpsampleOpt = "bilinear",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    max_pixels: Annotated[
        int | None,
        typer.Option(
            "--max-pixels", min=0, help="Decompression-bomb guard per image; 0 = no limit. Default as colorize."
        ),
    ] = None,
    torch_threads: Annotated[
        int | None,
        typer.Option(
            "--torch-threads", min=1, help="Torch threads per worker process (default: torch's; cores/--workers)."
        ),
    ] = None,
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
        flow = load_flow("colorize_archive", "colorize_archive_flow")
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
            raise fail(f"flow run {state.name}: {state.message}")
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
    except FileNotFoundError as err:
        raise fail(err) from None
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


def export_onnx_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Output .onnx file.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Official release name (see `ddcolor weights list`), a .safetensors or official .pth checkpoint. "
            "Required unless --random-init.",
        ),
    ] = None,
    preset: PresetOpt = None,
    random_init: Annotated[
        bool,
        typer.Option(
            "--random-init", help="Export a random-init model (atto unless --preset): for testing the toolchain."
        ),
    ] = False,
    opset: Annotated[int, typer.Option("--opset", min=17, help="ONNX opset (>= 17; 18 is the exporter's own).")] = 18,
) -> None:
    """Export the fp32 inference network to ONNX: gray_rgb (B,3,H,W) -> ab (B,2,H,W), dynamic B/H/W (x32)."""
    from ddcolor._optional import require

    require("onnx", "onnx", "ONNX export")  # before torch and the model load: fail fast with the install hint
    from ddcolor.export import export_onnx
    from ddcolor.model import build_model
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
    except (FileNotFoundError, ValueError) as err:
        raise fail(err) from None
    typer.echo(f"exported: {path} (opset {opset}; input gray_rgb (B,3,H,W), H and W multiples of 32)")
