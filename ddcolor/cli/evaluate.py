"""``ddcolor evaluate``: a model's metrics on a dataset's val split (`ddcolor.evaluate`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddcolor.cli._common import (
    PRECISION_HELP,
    ConfigOpt,
    JsonOpt,
    PrecisionName,
    ProgressOpt,
    fail,
    load_params,
    model_error,
    overrides_argument,
    print_json,
    say,
)


def evaluate_command(
    overrides: Annotated[list[str] | None, overrides_argument("eval.max_images=500 eval.batch_size=16")] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Official release name (see `ddcolor weights list`), a .safetensors or an official .pth checkpoint.",
        ),
    ] = ...,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Shard dataset (folder or s3:// prefix); its val split. Default: data.shards_uri.",
        ),
    ] = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output folder: metrics.json, report.md, samples.png.")
    ] = "runs/eval",
    config: ConfigOpt = None,
    random_init_metrics: Annotated[
        bool,
        typer.Option(
            "--random-init-metrics",
            help="Random-init Inception/AlexNet for FID/LPIPS: smoke tests only, MEANINGLESS FID and LPIPS.",
        ),
    ] = False,
    track: Annotated[
        bool, typer.Option("--track/--no-track", help="Log metrics to MLflow (MLFLOW_TRACKING_URI).")
    ] = True,
    run_name: Annotated[str | None, typer.Option("--run-name", help="MLflow run name.")] = "evaluate",
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id",
            help="Log into this existing MLflow run instead of a new one; 'model' = the training run recorded in the "
            "checkpoint (so `ddcolor gate/promote --run-id` see the val/* metrics on the run that made the model).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, cuda:N (default: cuda if available).")
    ] = None,
    progress: ProgressOpt = True,
    precision: Annotated[
        PrecisionName, typer.Option("--precision", help=f"{PRECISION_HELP} Metric networks: fp32.")
    ] = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a model on a dataset's val split: FID, colorfulness, ΔCF, PSNR, LPIPS -> metrics.json + report.md."""
    from ddcolor import weights
    from ddcolor.devices import resolve_device
    from ddcolor.model.checkpoint import checkpoint_run_id, load_model
    from ddcolor.pipeline import evaluate_network
    from ddcolor.tracking import TrackingError

    cfg = load_params(config, overrides or [])
    try:
        network = load_model(model)
    except (FileNotFoundError, ValueError) as err:  # also a damaged checkpoint or missing weights file
        raise model_error(err) from None
    if run_id == "model":
        run_id = checkpoint_run_id(model)
        if run_id is None:
            raise fail(f"{model} records no MLflow run (trained without tracking?); give --run-id ID")
    random_init_metrics = random_init_metrics or cfg.eval.metric_weights == "random"
    if random_init_metrics:
        typer.echo(
            "WARNING: --random-init-metrics: FID and LPIPS use RANDOM Inception/AlexNet networks; their values are "
            "MEANINGLESS (smoke test only)",
            err=True,
        )
    try:
        result = evaluate_network(
            cfg,
            network.to(resolve_device(device or "auto")),
            data or cfg.data.shards_uri,
            out_dir=out,
            track=track,
            run_name=run_name,
            run_id=run_id,
            random_metrics=random_init_metrics,
            precision=precision,
            progress=progress,
        )
    except TrackingError as err:
        raise fail(f"{err} (or pass --no-track)") from None
    except weights.WeightsError as err:  # the metric networks' weights
        raise fail(f"{str(err).strip(chr(39) + chr(34))} (or --random-init-metrics for a smoke test)") from None
    except (ValueError, FileNotFoundError) as err:
        raise fail(err) from None
    say(f"{result.n_images} images: " + ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()), json_out)
    say(f"report: {out}/report.md", json_out)
    if json_out:
        print_json(
            {
                "n_images": result.n_images,
                "metrics": result.metrics,
                "protocol": result.protocol,
                "out_dir": str(out),
                "report": f"{out}/report.md",
            }
        )
