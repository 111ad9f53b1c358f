"""colorize-archive (`ddcolor.archive`): outputs equal `ddcolor colorize` (colorize_files) on the same files,
accounting in the manifest, resumable reruns keyed by input hash + model id, and a worker killed with SIGKILL.

Random-init atto weights saved as a checkpoint, network input 64 px, fp32: seconds per run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddcolor.archive import ColorizeSettings, colorize_archive, read_manifest
from tests.helpers.images import ImageCorpus, make_random_images
from tests.helpers.outputs import assert_same_outputs, colorize_reference, output_files

SIZE = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """Two different random-init atto checkpoints (seed 0 and 1)."""
    from ddcolor.colorize import random_init_model
    from ddcolor.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("models")
    return tuple(
        save_checkpoint(random_init_model("atto", seed, warn=False), root / f"m{seed}.safetensors") for seed in (0, 1)
    )


def _settings(corpus: ImageCorpus | None = None) -> ColorizeSettings:
    return ColorizeSettings(
        input_size=SIZE, precision="fp32", device="cpu", max_pixels=corpus.max_pixels if corpus else None
    )


@pytest.mark.slow
def test_archive_equals_colorize_accounts_for_every_input_and_reruns_skip(bad_image_corpus, checkpoints, tmp_path):
    corpus, (model, other_model) = bad_image_corpus, checkpoints
    sub = corpus.root / "album" / "2024"
    sub.mkdir(parents=True)
    (sub / "nested.png").write_bytes(corpus.good[0].read_bytes())
    (corpus.root / ".hidden.png").write_bytes(corpus.good[0].read_bytes())
    out, ref = tmp_path / "out", tmp_path / "ref"

    report = colorize_archive(corpus.root, out, str(model), settings=_settings(corpus), workers=0, batch_size=3)
    colorize_reference(corpus.root, ref, model, corpus.max_pixels)
    assert_same_outputs(out, ref)
    assert "album/2024/nested.jpg" in output_files(out)  # JPEG content: the format's extension, as colorize
    assert report.balanced and report.skipped == 0 and report.done == len(output_files(ref))
    unreadable = {p.name for p in corpus.bad if p.suffix != ".txt"} - {"tiny.png"}  # 16 px: too small to ingest only
    assert {Path(r.input).name for r in report.failed} == unreadable

    records = read_manifest(str(out))
    assert len(records) == report.inputs and not any(".hidden" in r["input"] for r in records)
    by_status = {s: [r for r in records if r["status"] == s] for s in ("done", "skipped", "failed")}
    assert len(by_status["done"]) == report.done and all(r["reason"] for r in by_status["failed"])
    assert all(r["input_sha256"] and r["output"] for r in by_status["done"])

    # a rerun decodes nothing it already wrote; only the failed inputs are tried again
    before = {name: p.stat().st_mtime_ns for name, p in output_files(out).items()}
    again = colorize_archive(corpus.root, out, str(model), settings=_settings(corpus), workers=0, batch_size=3)
    assert (again.done, again.skipped, len(again.failed)) == (0, report.done, len(report.failed))
    assert {name: p.stat().st_mtime_ns for name, p in output_files(out).items()} == before
    assert {r["status"] for r in read_manifest(str(out))} == {"skipped", "failed"}

    # a changed input, or another model, is colorized again
    changed = corpus.good[1]
    changed.write_bytes(corpus.good[2].read_bytes())
    third = colorize_archive(corpus.root, out, str(model), settings=_settings(corpus), workers=0, batch_size=3)
    assert third.done == 1 and third.skipped == report.done - 1
    other = colorize_archive(corpus.root, out, str(other_model), settings=_settings(corpus), workers=0)
    assert other.done == report.done and other.model_id != report.model_id


@pytest.mark.slow
def test_archive_on_a_local_process_pool_equals_colorize(checkpoints, tmp_path, monkeypatch):
    """Also with the listing streamed in windows (of 4 inputs here): one pool serves every window."""
    from ddcolor import archive

    monkeypatch.setattr(archive, "LIST_WINDOW", 4)
    model = checkpoints[0]
    make_random_images(tmp_path / "src", 5)
    report = colorize_archive(
        tmp_path / "src", tmp_path / "out", str(model), settings=_settings(), workers=2, batch_size=2
    )
    colorize_reference(tmp_path / "src", tmp_path / "ref", model, None)
    assert report.inputs == report.done == 5 and not report.failed
    assert_same_outputs(tmp_path / "out", tmp_path / "ref")
    assert len(read_manifest(str(tmp_path / "out"))) == 5
    assert len({r["worker"] for r in read_manifest(str(tmp_path / "out"))}) == 2  # both processes took batches


def test_archive_refuses_to_write_into_its_source(checkpoints, tmp_path):
    from ddcolor.archive import ArchiveError

    make_random_images(tmp_path / "src", 1)
    with pytest.raises(ArchiveError, match="is the source folder"):
        colorize_archive(tmp_path / "src", tmp_path / "src", str(checkpoints[0]), settings=_settings(), workers=0)


def test_resolve_model_pins_a_file_by_content(checkpoints):
    from ddcolor.archive import resolve_model

    (spec0, id0), (_, id1) = resolve_model(str(checkpoints[0])), resolve_model(str(checkpoints[1]))
    assert spec0 == str(checkpoints[0].resolve()) and id0.startswith("sha256:") and id0 != id1
    with pytest.raises(FileNotFoundError, match="not a file, an official release"):
        resolve_model("no/such/model.safetensors")


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_loses_nothing(checkpoints, tmp_path):
    """`ddcolor colorize-archive` with one worker process: SIGKILL it after two files; the run fails and says to
    rerun; the rerun colorizes the rest and skips the finished files; outputs equal `ddcolor colorize`."""
    import psutil

    model = checkpoints[0]
    make_random_images(tmp_path / "src", 10)
    out = tmp_path / "out"
    cmd = [Path(sys.executable).parent / "ddcolor", "colorize-archive", tmp_path / "src", "--out", out]
    cmd += ["--model", model, "--workers", "1", "--batch-size", "2", "--input-size", str(SIZE), "--precision", "fp32"]
    cmd += ["--device", "cpu"]
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    markers = out / ".ddcolor" / "done"
    deadline = time.monotonic() + 240
    while not (markers.is_dir() and len(list(markers.iterdir())) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no file colorized in time"
        time.sleep(0.05)
    # the pool's worker: a grandchild (CLI -> forkserver -> worker)
    workers = [g for c in psutil.Process(proc.pid).children() for g in c.children()]
    assert workers, "no worker process found"
    for worker in workers:
        os.kill(worker.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "rerun the same command" in output, output
    finished = len(list(markers.iterdir()))
    assert 2 <= finished < 10

    report = colorize_archive(tmp_path / "src", out, str(model), settings=_settings(), workers=0)
    assert (report.skipped, report.done, report.failed) == (finished, 10 - finished, [])
    colorize_reference(tmp_path / "src", tmp_path / "ref", model, None)
    assert_same_outputs(out, tmp_path / "ref")
