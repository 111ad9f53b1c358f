"""The `ddcolor` command line: one module per command group, each command a thin wrapper over the library.

===================  =====================================================================
module               commands
===================  =====================================================================
``colorize``         colorize, colorize-archive, export-onnx
``data``             samples, ingest, validate, gc
``train``            train, finetune
``evaluate``         evaluate
``registry``         gate, promote, approve
``pipeline``         pipeline, demo, automations apply
``ui``               ui
``weights``          weights list, fetch, import
``_common``          shared option types, `load_params`, `fail` and output helpers
===================  =====================================================================

Errors: a library failure (`ddcolor.errors.DDColorError`) that reaches the top ends in one ``Error: ...`` line, exit
1 (2 for a bad configuration); ``-v`` shows its traceback instead. A missing optional dependency exits 3 with the
``pip install`` that adds it. Commands catch only what needs another exit code or a hint.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from typer.core import TyperGroup

from ddcolor.cli import colorize, data, evaluate, pipeline, registry, train, ui, weights

__all__ = ["EXIT_MISSING_EXTRA", "app"]

EXIT_MISSING_EXTRA = 3  # an optional dependency is not installed (the message names the `pip install` to run)


class _Group(TyperGroup):
    """Turns the errors a command does not handle into one line and an exit code: a missing optional dependency
    into its `pip install 'ddcolor[extra]'` hint (exit 3), a `DDColorError` into its message (exit 1; 2 for a
    `ConfigError`)."""

    def invoke(self, ctx):
        from ddcolor._optional import missing_extra
        from ddcolor.config import ConfigError
        from ddcolor.errors import DDColorError

        try:
            return super().invoke(ctx)
        except ImportError as exc:  # before DDColorError: `MissingExtraError` is both
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

# The commands, in the order `ddcolor --help` lists them.
for _name, _command in (
    ("colorize", colorize.colorize_command),
    ("colorize-archive", colorize.colorize_archive_command),
    ("gc", data.gc_command),
    ("pipeline", pipeline.pipeline_command),
    ("demo", pipeline.demo_command),
    ("export-onnx", colorize.export_onnx_command),
    ("approve", registry.approve_command),
    ("validate", data.validate_command),
    ("ingest", data.ingest_command),
    ("samples", data.samples_command),
    ("train", train.train_command),
    ("finetune", train.finetune_command),
    ("evaluate", evaluate.evaluate_command),
    ("gate", registry.gate_command),
    ("promote", registry.promote_command),
    ("ui", ui.ui_command),
):
    app.command(_name)(_command)
del _name, _command
app.add_typer(weights.app, name="weights")
app.add_typer(pipeline.automations_app, name="automations")


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
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging, and the traceback of an error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    _load_dotenv()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
