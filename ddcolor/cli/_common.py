"""What the command modules share: option types, the config loader, error exits, output helpers.

An option type is ``Annotated[type, typer.Option(...)]``, so a command declares ``config: ConfigOpt = None`` and
every command spells ``--config`` the same way. Options whose help differs per command (``--model``, ``--out``)
are declared where they are used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ddcolor.config import Config

# --- option types ----------------------------------------------------------------------------------------------
DeviceName = Literal["auto", "cpu", "cuda", "mps"]
PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
PRECISION_HELP = "Network precision: auto = bf16 on a GPU/CPU with native bf16 (AMX, AVX-512-BF16, sm80+), else fp32."

ConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--config", "-c", help="params.yaml to read. Default: ./params.yaml if present, else built-in defaults."
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print one JSON document on stdout, for CI (human-readable lines go to stderr)."),
]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
TrackOpt = Annotated[bool, typer.Option("--track/--no-track", help="Log to MLflow (MLFLOW_TRACKING_URI).")]
RunNameOpt = Annotated[str | None, typer.Option("--run-name", help="MLflow run name.")]
DeviceOpt = Annotated[DeviceName, typer.Option("--device", help="Where the network runs.")]
PrecisionOpt = Annotated[PrecisionName, typer.Option("--precision", help=PRECISION_HELP)]
InputSizeOpt = Annotated[int, typer.Option("--input-size", help="Network resolution, px (multiple of 32).")]
AbUpsampleOpt = Annotated[
    Literal["bilinear", "nearest"],
    typer.Option("--ab-upsample", help="How ab returns to full size; nearest reproduces the official pipeline."),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", help="Preset (atto|tiny|large) of an official .pth (inferred if absent) or for --random-init."
    ),
]


def overrides_argument(example: str) -> typer.models.ArgumentInfo:
    """The trailing ``[KEY=VALUE]...`` config overrides; `example` shows two of them in the help."""
    return typer.Argument(metavar="[KEY=VALUE]...", help=f"Config overrides, e.g. {example}.")


# --- configuration ---------------------------------------------------------------------------------------------
def params_path(config: str | None) -> str | None:
    """``--config`` as given, else ``./params.yaml`` when there is one, else None (the built-in defaults)."""
    if config is not None:
        return config
    return "params.yaml" if Path("params.yaml").is_file() else None


def load_params(config: str | None, overrides: Sequence[str] = ()) -> Config:
    """The configuration of a command: `params_path` (``--config``) with dotted ``KEY=VALUE`` `overrides` applied.

    A bad file or key raises `ddcolor.config.ConfigError`, which the CLI turns into exit 2 naming the key.
    """
    from ddcolor.config import load_config

    return load_config(params_path(config), overrides=list(overrides))


# --- errors and output -----------------------------------------------------------------------------------------
def fail(err: BaseException | str, code: int = 1) -> typer.Exit:
    """Print ``Error: <err>`` on stderr and return the `typer.Exit` to raise (``raise fail(err) from None``).

    The quotes a ``KeyError`` or a path-only ``FileNotFoundError`` puts around its message are dropped. A
    `DDColorError` needs no call here: the CLI's group prints it the same way, once.
    """
    typer.echo(f"Error: {str(err).strip(chr(39) + chr(34))}", err=True)
    return typer.Exit(code)


def model_error(err: BaseException) -> typer.Exit:
    """`fail` for a model that could not be loaded: a missing file also says how to list and fetch releases."""
    msg = str(err).strip("'\"")
    if isinstance(err, FileNotFoundError) and "ddcolor weights" not in msg:
        msg += " (see `ddcolor weights list`; fetch a release with `ddcolor weights fetch NAME`)"
    return fail(msg)


def say(text: str, json_out: bool) -> None:
    """Human-readable output: stdout, or stderr when --json keeps stdout for the JSON document."""
    typer.echo(text, err=json_out)


def print_json(obj: object) -> None:
    """The one JSON document of a ``--json`` command, on stdout."""
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


# --- services --------------------------------------------------------------------------------------------------
def require_tracking_server() -> None:
    """Fail in one line, at once, when MLFLOW_TRACKING_URI names an HTTP server that does not answer (MLflow's own
    client would retry for minutes before saying the same).

    Raises:
        ddcolor.tracking.TrackingError: the server does not answer (exit 1).
    """
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


def load_flow(module: str, name: str):
    """The flow ``name`` of flows/<module>.py in this checkout (not part of the installed package), on local Prefect.

    Without PREFECT_API_URL, Prefect runs a temporary local server on the SQLite database in PREFECT_HOME: it is
    kept in ./.prefect (git-ignored), so `PREFECT_HOME=.prefect prefect server start` shows these runs later.
    """
    import importlib
    import os
    import sys

    from ddcolor._optional import require

    root = Path(__file__).resolve().parents[2]  # ddcolor/cli/_common.py -> the checkout
    if not (root / "flows" / f"{module}.py").is_file():
        raise fail(f"no flows/{module}.py next to {root / 'ddcolor'}; run from a source checkout")
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    require("prefect", "mlops", f"the {module.replace('_', '-')} flow")
    return getattr(importlib.import_module(f"flows.{module}"), name)
