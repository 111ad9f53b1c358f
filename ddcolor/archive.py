"""Batch colorization of a whole collection (a local folder or ``s3://`` prefix) on a process pool, Dask or Ray.

``colorize_archive(SRC, DST, model)`` colorizes every image under SRC into DST with the same relative path, and the
same format, size, bit depth, alpha and EXIF as ``ddcolor colorize`` (the same per-file path: `read_image` ->
`Colorizer.colorize_float` -> `write_image`). Layout of DST::

    <relative path of each input>                  # the colorized image (extension kept when it fits the format)
    .ddcolor/done/<relative path>.json             # marker: {input_sha256, model_id, output}, written after it
    colorize-manifest.parquet                      # every input of the last run: done / skipped / failed + reason

Resumable and idempotent: an input whose marker names the same input sha256 and model id, and whose output exists,
is ``skipped`` without decoding; anything else is (re)done. The marker is written after the output, so a worker
killed between the two only costs a redo. The model is pinned once per run (``models:/ddcolor@champion`` ->
``models:/ddcolor/7``), so every worker uses the same version even if the alias moves mid-run.

Workers get small `ArchiveJob` s (URIs + settings; no credentials, no pixels) and return one small `ArchiveRecord`
per input; they read and write the images themselves. Each worker process loads the model once (`_colorizer`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddcolor import storage
from ddcolor.errors import DDColorError
from ddcolor.fanout import ProcessPoolMapper, mapper_session, windows
from ddcolor.imageio import DEFAULT_MAX_PIXELS, FORMAT_EXTENSIONS, IMAGE_EXTENSIONS, ImageReadError, read_image

__all__ = [
    "MANIFEST_NAME",
    "MARKER_DIR",
    "ArchiveError",
    "ArchiveJob",
    "ArchiveRecord",
    "ArchiveReport",
    "ColorizeSettings",
    "colorize_archive",
    "colorize_batch",
    "list_archive_inputs",
    "resolve_model",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "colorize-manifest.parquet"
MARKER_DIR = ".ddcolor/done"
BATCH = 8  # files per job: big enough to amortise a task's overhead, small enough to spread over workers
LIST_WINDOW = 16384  # inputs listed and mapped at a time (the listing is streamed)


class ArchiveError(DDColorError, RuntimeError):
    """A run-level problem: a worker process died, an unknown model, SRC and DST overlapping."""


@dataclass(frozen=True)
class ColorizeSettings:
    """How every worker colorizes (the `ddcolor.colorize.Colorizer` arguments and the decode bomb guard).

    ``torch_threads``: intra-op threads of each worker process (None: torch's default, one per core of the
    machine). Several worker processes on one machine should share its cores (cores // processes): measured on
    this 2-core machine under load, 2 OpenMP threads per process cost 46 s per 256 px image against 1.7 s with one.
    """

    input_size: int = 512
    ab_upsample: str = "bilinear"
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    torch_threads: int | None = None


@dataclass(frozen=True)
class ArchiveJob:
    """One batch for `colorize_batch` (picklable, small: URIs and settings only; no credentials).

    Attributes:
        items: ``(input URI, relative path below SRC)`` pairs. out: DST. model: a pinned model spec (what
        `load_colorization_model` takes). model_id: its identity, recorded in markers. settings: how to colorize.
    """

    items: tuple[tuple[str, str], ...]
    out: str
    model: str
    model_id: str
    settings: ColorizeSettings


@dataclass(frozen=True)
class ArchiveRecord:
    """What became of one input: ``status`` is ``done``, ``skipped`` (already colorized by this model) or
    ``failed`` (``reason`` says why). ``output``: relative path in DST. ``seconds``: this input's wall time."""

    input: str
    relative: str
    status: str
    reason: str = ""
    input_sha256: str | None = None
    output: str | None = None
    seconds: float = 0.0
    worker: str = ""


@dataclass
class ArchiveReport:
    """One run: ``inputs == done + skipped + len(failed)`` always holds."""

    source: str
    out: str
    model: str
    model_id: str
    inputs: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[ArchiveRecord] = field(default_factory=list)
    seconds: float = 0.0
    manifest_uri: str = ""
    workers: int = 0

    @property
    def balanced(self) -> bool:
        return self.inputs == self.done + self.skipped + len(self.failed)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"{self.inputs} inputs: {self.done} colorized, {self.skipped} skipped (already done), "
            f"{len(self.failed)} failed ({self.seconds:.1f} s, {self.images_per_second:.2f} img/s)",
            f"{self.source} -> {self.out} with {self.model} ({self.model_id}); manifest {self.manifest_uri}",
        ]
        lines.extend(f"  failed {r.input}: {r.reason}" for r in self.failed)
        return "\n".join(lines)

    def to_markdown(self, max_failures: int = 50) -> str:
        rows = [
            "# colorize-archive",
            "",
            f"`{self.source}` -> `{self.out}` with `{self.model}` (`{self.model_id}`)",
            "",
            "| inputs | colorized | skipped (already done) | failed | seconds | img/s | workers |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {self.inputs} | {self.done} | {self.skipped} | {len(self.failed)} | {self.seconds:.1f} | "
            f"{self.images_per_second:.2f} | {self.workers or '-'} |",
            "",
            f"Manifest: `{self.manifest_uri}`",
        ]
        if self.failed:
            rows += ["", "## Failures", "", "| input | reason |", "|---|---|"]
            rows += [f"| `{r.input}` | {r.reason.replace('|', '/')} |" for r in self.failed[:max_failures]]
            if len(self.failed) > max_failures:
                rows.append(f"| ... | {len(self.failed) - max_failures} more in the manifest |")
        return "\n".join(rows)


# --- model identity ---------------------------------------------------------------------------------------


def resolve_model(spec: str) -> tuple[str, str]:
    """Pin a model spec for a run: ``(spec every worker loads, model id recorded in markers)``.

    ``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (an alias that moves mid-run does not mix models); a
    checkpoint file -> itself, id ``sha256:<hex of the file>``; a release name -> itself, id ``release:<name>``.

    Raises:
        ArchiveError: a registered model or alias that does not exist; FileNotFoundError: a missing file.
    """
    text = str(spec)
    if text.startswith("models:/"):
        name, at, alias = text.removeprefix("models:/").partition("@")
        if not at:
            return text, text  # models:/NAME/VERSION or models:/m-ID: already pinned
        from ddcolor.registry import _client

        try:
            version = _client().get_model_version_by_alias(name, alias).version
        except Exception as err:
            raise ArchiveError(f"cannot resolve {text!r} in the MLflow registry (MLFLOW_TRACKING_URI): {err}") from err
        pinned = f"models:/{name}/{version}"
        return pinned, pinned
    if text.startswith("runs:/"):
        return text, text
    path = Path(text)
    if path.is_file():
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        return str(path.resolve()), f"sha256:{digest.hexdigest()}"
    from ddcolor.model import OFFICIAL_RELEASES

    if text.removeprefix("official:") in OFFICIAL_RELEASES:
        return text, f"release:{text.removeprefix('official:')}"
    raise FileNotFoundError(f"model {text!r}: not a file, an official release or a models:/ URI")


# --- worker side ------------------------------------------------------------------------------------------

_CACHE: dict[tuple[str, ColorizeSettings], Any] = {}


def _colorizer(model: str, settings: ColorizeSettings) -> Any:
    """The `Colorizer` of this process for (model, settings): loaded once, one model kept (bounded memory)."""
    key = (model, settings)
    if key not in _CACHE:
        from ddcolor.colorize import Colorizer, load_colorization_model

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)

        _CACHE.clear()
        net = load_colorization_model(model)
        _CACHE[key] = Colorizer(
            net,
            input_size=settings.input_size,
            ab_upsample=settings.ab_upsample,
            device=settings.device,
            precision=settings.precision,
        )
        log.info("loaded %s in process %d", model, os.getpid())
    return _CACHE[key]


def _output_relative(relative: str, fmt: str) -> str:
    """As `ddcolor colorize`: keep the extension when it fits the format, else the format's first extension."""
    path = Path(relative)
    return str(path if path.suffix.lower() in FORMAT_EXTENSIONS[fmt] else path.with_suffix(FORMAT_EXTENSIONS[fmt][0]))


def _marker_uri(out: str, relative: str) -> str:
    return storage.join(out, MARKER_DIR, f"{relative}.json")


def _read_marker(out: str, relative: str) -> dict[str, Any] | None:
    try:
        marker = storage.read_json(_marker_uri(out, relative))
    except storage.StorageNotFoundError:
        return None
    except (storage.StorageError, ValueError):
        return None  # unreadable marker: redo the file
    return marker if isinstance(marker, dict) else None


def _worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _colorize_one(uri: str, relative: str, job: ArchiveJob) -> ArchiveRecord:
    from ddcolor.imageio import write_image

    start = time.perf_counter()
    here = _worker_name()

    def record(status: str, **kw: Any) -> ArchiveRecord:
        return ArchiveRecord(uri, relative, status, seconds=time.perf_counter() - start, worker=here, **kw)

    try:
        data = storage.read_bytes(uri)
    except storage.StorageError as err:
        if storage.is_s3(uri) and not isinstance(err, storage.StorageNotFoundError):
            raise  # infrastructure: the task fails and is retried, or a rerun completes the archive
        return record("failed", reason=f"cannot read: {err.reason}")
    sha = hashlib.sha256(data).hexdigest()
    marker = _read_marker(job.out, relative)
    if (
        marker is not None
        and marker.get("input_sha256") == sha
        and marker.get("model_id") == job.model_id
        and storage.exists(storage.join(job.out, marker.get("output", "")))
    ):
        return record("skipped", reason="already colorized by this model", input_sha256=sha, output=marker["output"])
    with tempfile.TemporaryDirectory(prefix="ddcolor-archive-") as tmp:
        suffix = Path(relative).suffix if Path(relative).suffix.lower() in IMAGE_EXTENSIONS else ".img"
        local_in = Path(uri) if not storage.is_s3(uri) else Path(tmp) / f"input{suffix}"
        if storage.is_s3(uri):
            local_in.write_bytes(data)
        try:
            image = read_image(local_in, max_pixels=job.settings.max_pixels)
        except ImageReadError as err:
            return record("failed", reason=err.reason, input_sha256=sha)
        output = _output_relative(relative, image.format)
        target = storage.join(job.out, output)
        if not storage.is_s3(target) and Path(target).resolve() == Path(uri).resolve():
            return record("failed", reason="the output would replace the input", input_sha256=sha)
        try:
            (rgb,) = _colorizer(job.model, job.settings).colorize_float([image.rgb])
        except (RuntimeError, ValueError) as err:  # e.g. out of device memory: report, keep going
            return record("failed", reason=f"colorization failed ({type(err).__name__}: {err})", input_sha256=sha)
        try:
            if storage.is_s3(target):
                local_out = Path(tmp) / f"output{Path(output).suffix}"
                write_image(local_out, rgb, image.alpha, image.bit_depth, image.format, image.exif)
                storage.upload_file(local_out, target)
            else:
                write_image(target, rgb, image.alpha, image.bit_depth, image.format, image.exif)
        except (OSError, ValueError) as err:
            if isinstance(err, storage.StorageError) and not isinstance(err, storage.StorageNotFoundError):
                raise
            return record("failed", reason=f"cannot write {target}: {err}", input_sha256=sha)
    storage.write_json(
        _marker_uri(job.out, relative),
        {"input": uri, "input_sha256": sha, "model": job.model, "model_id": job.model_id, "output": output},
    )
    return record("done", input_sha256=sha, output=output)


def colorize_batch(job: ArchiveJob) -> list[ArchiveRecord]:
    """Colorize ``job.items`` (the unit of work of a fan-out; runs wherever ``ddcolor`` is installed).

    Returns:
        One `ArchiveRecord` per item, in order; a bad file is a ``failed`` record, never an exception.

    Raises:
        StorageError: S3 unreachable after retries (the task fails; a retry or a rerun completes the archive).
    """
    return [_colorize_one(uri, relative, job) for uri, relative in job.items]


# --- driver side ------------------------------------------------------------------------------------------


def list_archive_inputs(source: str, exclude: str | None = None) -> Iterator[tuple[str, str]]:
    """``(URI, relative path)`` of every image under ``source`` (image extensions; hidden files and folders, and
    anything under ``exclude``, left out), sorted."""
    root = source if storage.is_s3(source) else str(Path(source))
    prefix = root.rstrip("/") + "/"
    skip = None if exclude is None else exclude.rstrip("/") + "/"
    for uri in storage.iter_files(root):
        if skip is not None and (uri + "/").startswith(skip):
            continue
        rel = uri[len(prefix) :] if uri.startswith(prefix) else Path(uri).name
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
            yield uri, rel


MapBatches = Callable[
    [Callable[[ArchiveJob], list[ArchiveRecord]], Sequence[ArchiveJob]], Iterable[list[ArchiveRecord]]
]


def _write_manifest(uri: str, records: list[ArchiveRecord], report: ArchiveReport) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [getattr(r, name) for r in records] for name in ArchiveRecord.__dataclass_fields__}
    schema = pa.schema(
        [
            ("input", pa.string()),
            ("relative", pa.string()),
            ("status", pa.dictionary(pa.int8(), pa.string())),
            ("reason", pa.string()),
            ("input_sha256", pa.string()),
            ("output", pa.string()),
            ("seconds", pa.float64()),
            ("worker", pa.string()),
        ]
    )
    meta = {k: v for k, v in asdict(report).items() if k not in ("failed",)}
    table = pa.Table.from_pydict(columns, schema=schema.with_metadata({"ddcolor": json.dumps(meta, default=str)}))
    with tempfile.TemporaryDirectory(prefix="ddcolor-manifest-") as tmp:
        path = Path(tmp) / MANIFEST_NAME
        pq.write_table(table, path, compression="zstd")
        storage.upload_file(path, uri)


def read_manifest(out: str) -> list[dict[str, Any]]:
    """The records of the last run into ``out`` (one dict per input)."""
    import pyarrow.parquet as pq

    with storage.open_input_file(storage.join(out, MANIFEST_NAME)) as fh:
        return pq.read_table(fh).to_pylist()


def colorize_archive(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str,
    *,
    settings: ColorizeSettings | None = None,
    map_batches: MapBatches | None = None,
    workers: int | None = None,
    batch_size: int = BATCH,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> ArchiveReport:
    """Colorize every image under ``source`` into ``out`` (resumable; see the module docstring).

    Args:
        source, out: local folders or ``s3://`` prefixes. model: a release name, checkpoint file or
            ``models:/NAME@ALIAS`` (pinned once for the run: `resolve_model`).
        settings: how to colorize (input size, precision, ...). map_batches: run `colorize_batch` on an executor
            (``map_batches(colorize_batch, jobs)`` -> one list per job, in order: `ddcolor.fanout.TaskRunnerMapper`
            for Prefect/Dask/Ray); default: a local process pool of ``workers`` processes (0 = this process; None =
            one per core). batch_size: files per job.
        progress: a tqdm bar. on_progress: called as ``on_progress(inputs_done, inputs_listed)`` after each batch
            (the listing is streamed in windows of `LIST_WINDOW` inputs: the second number grows until it is complete).

    Returns:
        The `ArchiveReport`; the manifest at ``out/colorize-manifest.parquet`` lists every input.

    Raises:
        ArchiveError: ``out`` is ``source``. ddcolor.fanout.WorkerDiedError: a local worker process died (rerun to
            complete: finished outputs are kept).
        StorageError: SOURCE or DEST unreachable after retries (rerun to complete).
    """
    from tqdm.auto import tqdm

    started = time.monotonic()
    source, out = str(source), str(out)
    if not storage.is_s3(out):
        out = str(Path(out).resolve())
    if not storage.is_s3(source) and Path(source).resolve() == Path(out):
        raise ArchiveError(f"--out {out} is the source folder; choose another folder (inputs are never replaced)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1 file per batch")
    settings = settings or ColorizeSettings()
    pinned, model_id = resolve_model(model)
    exclude = out if storage.is_s3(source) == storage.is_s3(out) else None
    listing = list_archive_inputs(source if storage.is_s3(source) else str(Path(source).resolve()), exclude)
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    report = ArchiveReport(source, out, pinned, model_id, inputs=0, workers=workers if not map_batches else 0)
    log.info("colorize-archive %s -> %s with %s", source, out, pinned)
    mapper = map_batches or ProcessPoolMapper(workers)
    records: list[ArchiveRecord] = []
    bar = tqdm(unit="img", desc="colorize-archive", disable=not progress, dynamic_ncols=True)
    # the listing is streamed: one window of inputs is listed (and held) at a time
    with bar, mapper_session(mapper):
        for window, last in windows(listing, LIST_WINDOW):
            report.inputs += len(window)
            if last:  # the listing is complete: the bar gets its total
                bar.total = report.inputs
                bar.refresh()
            jobs = [
                ArchiveJob(tuple(window[i : i + batch_size]), out, pinned, model_id, settings)
                for i in range(0, len(window), batch_size)
            ]
            results = mapper(colorize_batch, jobs)
            try:
                for index, batch in enumerate(results):
                    if index >= len(jobs) or [r.input for r in batch] != [uri for uri, _ in jobs[index].items]:
                        raise ArchiveError(f"map_batches returned batch {index} out of order; a mapper must keep order")
                    records.extend(batch)
                    bar.update(len(batch))
                    if on_progress is not None:
                        on_progress(len(records), report.inputs)
            finally:
                with contextlib.suppress(Exception):
                    getattr(results, "close", lambda: None)()
    if len(records) != report.inputs:
        raise ArchiveError(f"map_batches returned {len(records)} records for {report.inputs} inputs")
    for r in records:
        if r.status == "done":
            report.done += 1
        elif r.status == "skipped":
            report.skipped += 1
        else:
            report.failed.append(r)
            log.warning("failed %s: %s", r.input, r.reason)
    report.seconds = time.monotonic() - started
    report.manifest_uri = storage.join(out, MANIFEST_NAME)
    _write_manifest(report.manifest_uri, records, report)
    assert report.balanced, report
    log.info(report.summary())
    return report
