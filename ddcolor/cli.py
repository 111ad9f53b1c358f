"""The `ddcolor` command line. Each command is a thin wrapper over a library function."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="DDColor platform: colorize, train, evaluate.")

# --- weights -------------------------------------------------------------------------------------------
weights_app = typer.Typer(no_args_is_help=True, help="Inspect and fill the local weights cache.")
app.add_typer(weights_app, name="weights")


def _weights_fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"Error: {exc}", err=True)
    return typer.Exit(1)


@weights_app.command("list")
def weights_list(
    verify: bool = typer.Option(False, "--verify", help="Also hash and check present files (slow for GBs)."),
) -> None:
    """Show every known weight file: kind, present/missing, size, path."""
    from ddcolor import weights

    rows = weights.status(verify=verify)
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


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    app()
