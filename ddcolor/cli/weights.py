"""``ddcolor weights list|fetch|import``: the local weights cache (`ddcolor.weights`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddcolor.cli._common import JsonOpt, fail, print_json

app = typer.Typer(no_args_is_help=True, help="Inspect and fill the local weights cache.")


@app.command("list")
def weights_list(
    verify: Annotated[bool, typer.Option("--verify", help="Also hash and check present files (slow for GBs).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show every known weight file: kind, present/missing, size, path."""
    from ddcolor import weights

    rows = weights.status(verify=verify)
    corrupt = any(r.verified is False for r in rows)
    if json_out:
        print_json(
            {
                "cache_dir": str(weights.cache_dir()),
                "weights": [
                    {"name": r.name, "kind": r.kind, "present": r.present, "path": str(r.path)}
                    | {"size_bytes": r.size_bytes, "verified": r.verified}
                    for r in rows
                ],
            }
        )
        if corrupt:
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
    if corrupt:
        raise typer.Exit(1)


@app.command("fetch")
def weights_fetch(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name (see `weights list`), or 'all'.")],
    force: Annotated[
        bool, typer.Option("--force", help="Download again even if cached (replaces a bad file).")
    ] = False,
) -> None:
    """Download a weight file into the cache (needs internet)."""
    from ddcolor import weights

    names = list(weights.REGISTRY) if name == "all" else [name]
    try:
        for n in names:
            typer.echo(f"{n}: {weights.fetch(n, force=force)}")
    except OSError as err:  # a `WeightsError` reaches the CLI's group, which prints it the same way
        raise fail(err) from None


@app.command("import")
def weights_import(
    file: Annotated[str, typer.Argument(metavar="FILE", help="A weight file downloaded elsewhere.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Registry name; inferred from the file name if absent.")
    ] = None,
) -> None:
    """Copy a downloaded weight file into the cache, sha256-checked (for air-gapped machines)."""
    from ddcolor import weights

    try:
        path = weights.import_file(file, name)
    except OSError as err:
        raise fail(err) from None
    typer.echo(f"imported: {path}")
