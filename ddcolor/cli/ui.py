"""``ddcolor ui``: the web playground (`ddcolor.ui`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddcolor.cli._common import ConfigOpt, DeviceName, PrecisionOpt, fail, load_params


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ui_command(
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but loopback exposes the page.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port.")] = 7860,
    auth_token: Annotated[
        str | None,
        typer.Option(
            "--auth-token",
            envvar="DDCOLOR_UI_TOKEN",
            help="Require this token (HTTP basic-auth password, any user name, or 'Authorization: Bearer TOKEN').",
        ),
    ] = None,
    checkpoint: Annotated[
        list[str] | None,
        typer.Option("--checkpoint", metavar="PATH", help="Checkpoint file or folder to offer (repeatable)."),
    ] = None,
    allow_paths: Annotated[
        bool | None,
        typer.Option(
            "--allow-paths/--no-allow-paths",
            help="Let the page load any checkpoint path typed into it. Default: only when bound to loopback.",
        ),
    ] = None,
    config: ConfigOpt = None,
    input_size: Annotated[
        int, typer.Option("--input-size", help="Preselected network resolution, px (multiple of 32).")
    ] = 512,
    device: Annotated[DeviceName, typer.Option("--device", help="Where the networks run.")] = "auto",
    precision: PrecisionOpt = "auto",
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", min=0.001, help="Largest accepted file, MB.")
    ] = 20.0,
    max_files: Annotated[int, typer.Option("--max-files", min=1, help="Most files per request.")] = 16,
    cache_size: Annotated[
        int, typer.Option("--cache-size", min=1, help="Loaded (model, input size) pairs kept in memory.")
    ] = 3,
    registered_model: Annotated[
        str | None,
        typer.Option(
            "--registered-model",
            help="MLflow registered model to offer (champion, challenger, versions). Default: registry.model_name.",
        ),
    ] = None,
) -> None:
    """Start the web playground: colorize uploads with any registered version, release or checkpoint; compare them."""
    from ddcolor._optional import require

    uvicorn = require("uvicorn", "ui", "the playground")
    require("fastapi", "ui", "the playground")
    from ddcolor.ui import UiSettings, create_app
    from ddcolor.ui.app import MB

    cfg = load_params(config, [f"registry.model_name={registered_model}"] if registered_model else [])
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
    except (FileNotFoundError, ValueError) as err:  # a --checkpoint that is not there or not a model
        raise fail(err, 2) from None
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
