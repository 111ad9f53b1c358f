"""``ddcolor samples``, ``ingest``, ``validate`` and ``gc``: the shard dataset (`ddcolor.data`)."""

from __future__ import annotations

from typing import Annotated

import typer

from ddcolor.cli._common import (
    ConfigOpt,
    JsonOpt,
    ProgressOpt,
    fail,
    load_params,
    overrides_argument,
    print_json,
    say,
)


def samples_command(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder or s3://bucket/prefix to write the JPEG files into.")],
    count: Annotated[
        int, typer.Option("--count", "-n", min=1, help="Number of images (photos first, then variants).")
    ] = 48,
) -> None:
    """Write the built-in sample images: scikit-image photos plus deterministic crops/flips/rescales (offline).

    The same --count always gives the same bytes (stable DVC hashes). Earlier sample files that this run does not
    write are removed; other files are left alone.
    """
    from ddcolor.data.samples import write_samples

    try:
        written = write_samples(out, count)
    except RuntimeError as err:  # e.g. scikit-image's photos missing; a StorageError reaches the CLI's group
        raise fail(err) from None
    typer.echo(f"wrote {len(written)} sample images to {out}")


def ingest_command(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="Raw images: a local folder or s3://bucket/prefix.")],
    overrides: Annotated[list[str] | None, overrides_argument("data.size=64 data.shard_rows=512")] = None,
    dest: Annotated[
        str | None,
        typer.Option("--dest", "-d", help="Dataset: a local folder or s3://bucket/prefix. Default: data.shards_uri."),
    ] = None,
    config: ConfigOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            "-j",
            min=0,
            help="Worker processes; 0 = in-process. Default: data.num_workers if the config sets it, else all cores.",
        ),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Decode, resize and Lab-encode images into Parquet shards (incremental, deduplicated, bad files quarantined).

    Exit code 0 when the run completed (quarantined files are listed), 1 on a storage or dataset failure, 2 on a
    bad configuration.
    """
    from ddcolor.data.ingest import ingest

    cfg = load_params(config, overrides or [])
    report = ingest(source, dest, cfg, num_workers=workers, progress=progress)
    typer.echo(report.summary())


def validate_command(
    uri: Annotated[str, typer.Argument(metavar="URI", help="Dataset folder or s3:// prefix holding manifest.json.")],
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="Another dataset version: per-image L/ab/colorfulness quantiles must match it.",
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            "-c",
            help="params.yaml whose data section (size, resize_mode, val_fraction, min_colorfulness) the dataset "
            "must match, and whose validate section gives the tolerances. Default: no data check (the manifest's own "
            "config is the expectation); tolerances from ./params.yaml if present, else built-in defaults.",
        ),
    ] = None,
    report: Annotated[
        bool,
        typer.Option("--report/--no-report", help="Write validation_report.md and validation.json next to the data."),
    ] = True,
    report_dir: Annotated[
        str | None,
        typer.Option(
            "--report-dir", help="Write the reports to this folder or s3:// prefix instead of next to the data."
        ),
    ] = None,
    split_tolerance: Annotated[
        float | None,
        typer.Option(
            "--split-tolerance",
            min=0.0,
            help="Allowed |val share - val_fraction| beyond sampling noise (overrides validate.split_abs).",
        ),
    ] = None,
    max_low_share: Annotated[
        float | None,
        typer.Option(
            "--max-low-share",
            min=0.0,
            max=1.0,
            help="Largest allowed share of low-colorfulness rows (overrides validate.max_low_colorfulness_share).",
        ),
    ] = None,
    drift_tol: Annotated[
        list[str] | None,
        typer.Option(
            "--drift-tol",
            metavar="COLUMN=VALUE",
            help="Absolute drift tolerance, e.g. L_mean=3 (repeatable; overrides validate.drift_abs.COLUMN).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Validate a shard dataset (manifest, checksums, Great Expectations suite, drift); exit 1 on failure.

    Tolerances: the validate section of the config, then the flags above (exit 2 on a bad value, naming the key)."""
    from ddcolor.config import ConfigError
    from ddcolor.data.validate import Tolerances, validate_dataset, write_reports
    from ddcolor.storage import StorageError

    overrides: dict = {}
    if split_tolerance is not None:
        overrides["validate.split_abs"] = split_tolerance
    if max_low_share is not None:
        overrides["validate.max_low_colorfulness_share"] = max_low_share
    drift = dict(item.partition("=")[::2] for item in drift_tol or [])
    try:
        cfg = load_params(config)
        if drift:  # merged onto the file's columns (a dotted key cannot reach into a mapping)
            overrides["validate.drift_abs"] = {**cfg.validate.drift_abs, **drift}
        cfg = cfg.with_overrides(overrides)
    except ConfigError as err:  # say which flags set validate.* keys
        flags = " (--split-tolerance, --max-low-share, --drift-tol set these validate.* keys)" if overrides else ""
        raise fail(f"{err}{flags}", 2) from None
    expected = cfg.data if config is not None else None
    result = validate_dataset(
        uri, reference=reference, expected=expected, tolerances=Tolerances.from_config(cfg.validate)
    )
    say(result.summary(), json_out)
    reports: list[str] = []
    if report:
        try:
            for written in write_reports(result, report_dir):
                reports.append(str(written))
                say(f"report: {written}", json_out)
        except (OSError, StorageError) as err:  # the verdict stands without its report
            typer.echo(f"WARNING: could not write the report: {err}", err=True)
    if json_out:
        print_json({**result.to_dict(), "reports": reports})
    if not result.success:
        raise typer.Exit(1)


def gc_command(
    dest: Annotated[str, typer.Argument(metavar="DEST", help="Shard dataset (folder or s3:// prefix).")],
    grace_hours: Annotated[
        float,
        typer.Option("--grace-hours", min=0, help="Keep unlisted files younger than this (an ingest may be running)."),
    ] = 24.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove orphan shards (left by crashed ingests; never read) and old hash-index files of a dataset."""
    from ddcolor.data.gc import collect_garbage

    report = collect_garbage(dest, grace_s=grace_hours * 3600, dry_run=dry_run)
    typer.echo(report.summary(dry_run))
