"""The pipeline without Prefect (`ddcolor.pipeline`): fingerprint and skip logic, retry classification, the torchrun
command, and whole runs on a tiny dataset (promote, skip, force, poisoned data) against a SQLite MLflow in tmp_path.

The tiny recipe (atto with a small color decoder, 64 px, 2 steps, random weights and random metric networks) makes
a whole run take ~30 s on 2 CPU cores; its metrics mean nothing, the control flow is what is tested.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ddcolor import pipeline
from ddcolor.config import ConfigError, load_config
from ddcolor.data.samples import write_samples
from ddcolor.registry import ChampionInfo
from ddcolor.storage import StorageError, StorageNotFoundError
from ddcolor.tracking import TrackingError
from ddcolor.train import TrainingDivergedError
from tests.helpers.data import poison_a_row
from tests.helpers.recipes import TINY_IMAGES, TINY_RECIPE, dotted

#: The shared tiny recipe as dotted overrides (random weights everywhere: meaningless metrics).
TINY = dotted(TINY_RECIPE)


def tiny_config(root: Path, name: str, **extra):
    """The tiny recipe with data under ``root`` and its own registered model / experiment ``name``."""
    return load_config(
        None,
        {
            **TINY,
            "data.source": str(root / "raw"),
            "data.shards_uri": str(root / "shards"),
            "registry.model_name": name,
            "registry.experiment_name": name,
            **extra,
        },
    )


# --- fingerprint and skip ----------------------------------------------------------------------------------


def test_fingerprint_follows_data_and_recipe_not_gates_registry_or_paths():
    cfg = load_config(None)
    base = pipeline.fingerprint(cfg, "a" * 64)
    assert base == pipeline.fingerprint(load_config(None), "a" * 64)  # deterministic
    assert len(base.value) == 64 and base.dataset_sha256 == "a" * 64
    for change in ({"train.lr": 3e-4}, {"data.size": 128}, {"model.preset": "tiny"}, {"eval.max_images": 10}):
        other = pipeline.fingerprint(cfg.with_overrides(change), "a" * 64)
        assert other.value != base.value and other.config_sha256 != base.config_sha256, change
    new_data = pipeline.fingerprint(cfg, "b" * 64)
    assert new_data.value != base.value and new_data.config_sha256 == base.config_sha256
    unrelated = (
        {"gates.min_psnr": 20.0},
        {"registry.model_name": "other"},
        {"data.shards_uri": "s3://bucket/shards", "data.source": "s3://bucket/raw", "data.num_workers": 0},
        {"train.log_every": 7, "train.checkpoint_dir": "/elsewhere"},
    )
    for change in unrelated:
        assert pipeline.fingerprint(cfg.with_overrides(change), "a" * 64) == base, change


def test_should_skip_says_why():
    fp = pipeline.Fingerprint("f" * 64, "d" * 64, "c" * 64)
    same = ChampionInfo("3", fp.value, fp.dataset_sha256, fp.config_sha256, "run")
    assert pipeline.should_skip(fp, None) == (False, "no champion yet")
    skip, why = pipeline.should_skip(fp, same)
    assert skip and "are those of champion v3" in why and "force" in why
    skip, why = pipeline.should_skip(fp, same, force=True)
    assert not skip and "forced" in why
    skip, why = pipeline.should_skip(fp, ChampionInfo("3", "x", "x", fp.config_sha256, "run"))
    assert not skip and why.startswith("dataset changed")
    skip, why = pipeline.should_skip(fp, ChampionInfo("3", "x", fp.dataset_sha256, "x", "run"))
    assert not skip and why.startswith("config changed")
    skip, why = pipeline.should_skip(fp, ChampionInfo("3", None, None, None, "run"))
    assert not skip and "no pipeline.fingerprint tag" in why


def test_section_overrides():
    assert pipeline.section_overrides(data={"size": 64}, train={"max_steps": 3, "betas": [0.9, 0.999]}, eval=None) == {
        "data.size": 64,
        "train.max_steps": 3,
        "train.betas": [0.9, 0.999],
    }
    with pytest.raises(TypeError, match="train: expected a mapping"):
        pipeline.section_overrides(train=["max_steps=3"])


def test_only_transient_errors_are_retried():
    failed = SimpleNamespace(uri="data/shards", failures=[SimpleNamespace(name="shards.readable")])
    wrapped = RuntimeError("MLflow call failed")
    wrapped.__cause__ = ConnectionRefusedError("connection refused")
    assert pipeline.is_transient(StorageError("s3://b/x", "endpoint unreachable after 5 attempts"))
    assert pipeline.is_transient(TrackingError("MLflow tracking server http://x is unreachable"))
    assert pipeline.is_transient(TimeoutError())
    assert pipeline.is_transient(wrapped)
    assert not pipeline.is_transient(pipeline.ValidationFailed(failed, "reports/validation_report.md"))
    assert not pipeline.is_transient(StorageNotFoundError("s3://b/x", "no such key"))
    assert not pipeline.is_transient(TrackingError("cannot open MLflow run 12ab: MlflowException: not found"))
    assert not pipeline.is_transient(ConfigError("train.lrr: unknown key"))
    assert not pipeline.is_transient(TrainingDivergedError(3, {"loss_g": float("nan")}, None))
    assert not pipeline.is_transient(ValueError("batch_size must be divisible"))


def test_validation_failed_names_the_report():
    failed = SimpleNamespace(uri="data/shards", failures=[SimpleNamespace(name="rows.L_length")])
    message = str(pipeline.ValidationFailed(failed, "runs/validation/validation_report.md"))
    assert "rows.L_length" in message and "runs/validation/validation_report.md" in message
    assert "Nothing was trained" in message


def test_torchrun_command(tmp_path):
    python = tmp_path / "bin" / "python"
    cmd = pipeline.torchrun_command("cfg.yaml", "s3://b/shards", "out", 4, run_name="nightly", python=str(python))
    assert cmd[:3] == [str(python), "-m", "torch.distributed.run"]  # no torchrun script next to that python
    assert cmd[3:] == [
        "--standalone",
        "--nproc_per_node",
        "4",
        "-m",
        "ddcolor.cli",
        "train",
        "--config",
        "cfg.yaml",
        "--data",
        "s3://b/shards",
        "--out",
        "out",
        "--no-progress",
        "--run-name",
        "nightly",
    ]
    python.parent.mkdir()
    (python.parent / "torchrun").write_text("#!/bin/sh\n")
    assert pipeline.torchrun_command("c", "d", "o", 2, python=str(python))[0] == str(python.parent / "torchrun")
    with pytest.raises(ValueError, match="nproc_per_node"):
        pipeline.torchrun_command("c", "d", "o", 0)


def test_distributed_step_streams_the_output_line_by_line_and_reports_failures(tmp_path, monkeypatch):
    """The launcher's lines reach ``on_line`` while it runs (it waits for the first one to be seen before going
    on), and a failure names the exit code and the last lines."""
    seen = tmp_path / "seen"
    script = tmp_path / "fake_torchrun.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "print('step 1/2 | loss_g 1.0', flush=True)\n"
        f"marker = pathlib.Path({str(seen)!r})\n"
        "for _ in range(300):\n"
        "    if marker.exists():\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "else:\n"
        "    print('the first line was not seen while running', file=sys.stderr)\n"
        "    sys.exit(2)\n"
        "print('Error: out of memory', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    monkeypatch.setattr(pipeline, "torchrun_command", lambda *a, **k: [sys.executable, str(script)])
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        seen.touch()

    cfg = load_config(None, {"train.max_steps": 2})
    with pytest.raises(RuntimeError, match=r"exited with code 1:\nstep 1/2 \| loss_g 1\.0\nError: out of memory"):
        pipeline.train_distributed_step(cfg, "shards", out_dir=tmp_path / "out", nproc_per_node=2, on_line=on_line)
    assert lines == ["step 1/2 | loss_g 1.0", "Error: out of memory"]
    assert load_config(tmp_path / "out" / "params.resolved.yaml") == cfg


def test_a_missing_result_json_names_the_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"train_result\.json: no readable training result"):
        pipeline.read_train_result(tmp_path / "train_result.json")


@pytest.mark.slow
def test_torchrun_path_reads_what_the_real_train_cli_writes(tmp_path):
    """The contract of the torchrun path, for real: `train_distributed_step` runs torchrun (1 process here) with the
    real ``ddcolor train --result-json``, and reads back the run id, model URI and paths it wrote."""
    import mlflow

    cfg = tiny_config(tmp_path, "pipe-torchrun")
    write_samples(cfg.data.source, TINY_IMAGES)
    pipeline.ingest_step(cfg)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    result = pipeline.train_distributed_step(
        cfg, cfg.data.shards_uri, out_dir=tmp_path / "out", nproc_per_node=1, tracking_uri=uri,
        tags={"pipeline.fingerprint": "f" * 64}, run_name="torchrun-contract", on_line=lines.append,
    )  # fmt: skip
    assert result.steps == 2 and set(result.final_losses) >= {"loss_g", "loss_d"}
    assert (
        Path(result.checkpoint_path) == tmp_path / "out" / "model.safetensors"
        and Path(result.checkpoint_path).is_file()
    )
    assert result.checkpoint_dir and Path(result.checkpoint_dir).is_dir()
    assert result.run_id and len(result.run_id) == 32 and result.model_uri
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(result.run_id)
    assert run.info.run_name == "torchrun-contract" and run.data.tags["pipeline.fingerprint"] == "f" * 64
    assert any(f"MLflow run: {result.run_id}" in line for line in lines)  # the human line still comes through


# --- whole runs ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_pipeline_promotes_then_skips_then_retrains_when_forced(tmp_path, tracking_uri):
    cfg = tiny_config(tmp_path, "pipe-a")
    write_samples(cfg.data.source, TINY_IMAGES)
    work = tmp_path / "work"
    run = dict(work_dir=work, tracking_uri=tracking_uri, progress=False, attach_onnx=False)

    first = pipeline.run_pipeline(cfg, **run)
    assert first.status == "promoted", first.summary()
    assert first.model_version == first.champion_version == "1"
    assert set(first.metrics) >= {"colorfulness", "psnr"} and first.gate_table.startswith("**Gate PASSED**")
    assert Path(first.grid).is_file() and Path(first.validation_report).is_file()
    client = _client(tracking_uri)
    version = client.get_model_version_by_alias("pipe-a", "champion")
    assert version.tags["pipeline.fingerprint"] == first.fingerprint
    assert version.tags["pipeline.dataset_sha256"] == first.dataset["manifest_sha256"]
    training_run = client.get_run(first.run_id)
    assert training_run.data.tags["pipeline.fingerprint"] == first.fingerprint
    assert "val/psnr" in training_run.data.metrics  # evaluation logged into the training run
    assert [a.path for a in client.list_artifacts(first.run_id, "samples")] == ["samples/grid.png"]
    assert json.loads(json.dumps(first.to_dict()))["status"] == "promoted"  # JSON-ready (flow result)
    assert "# train-ddcolor: promoted" in first.to_markdown() and "| psnr |" in first.to_markdown()

    second = pipeline.run_pipeline(cfg, **run)
    assert second.status == "skipped" and "champion v1" in second.reason, second.summary()
    assert second.run_id is None and second.fingerprint == first.fingerprint
    assert "train" not in second.seconds and Path(second.grid).is_file()  # still colorized with the champion
    assert len(client.search_model_versions("name='pipe-a'")) == 1

    forced = pipeline.run_pipeline(cfg, force=True, **run)
    assert forced.status in ("promoted", "not_promoted") and forced.model_version == "2", forced.summary()
    assert forced.run_id not in (None, first.run_id)


@pytest.mark.slow
def test_poisoned_dataset_stops_at_validation_with_nothing_registered(tmp_path, tracking_uri):
    cfg = tiny_config(tmp_path, "pipe-poisoned")
    write_samples(cfg.data.source, TINY_IMAGES)
    pipeline.ingest_step(cfg)
    poison_a_row(Path(cfg.data.shards_uri))

    result = pipeline.run_pipeline(cfg, work_dir=tmp_path / "work", tracking_uri=tracking_uri, progress=False)
    assert result.status == "validation_failed" and result.run_id is None
    assert "failed validation" in result.reason and result.validation_report in result.reason
    assert "FAILED" in Path(result.validation_report).read_text()
    client = _client(tracking_uri)
    assert client.search_model_versions("name='pipe-poisoned'") == []
    assert client.get_experiment_by_name("pipe-poisoned") is None  # no training run was even started


# --- the CLI glue (the pipeline itself is faked: the runs above test it) ------------------------------------


@pytest.fixture
def fake_run_pipeline(monkeypatch, tmp_path):
    calls = []

    def fake(config, source=None, **kwargs):
        calls.append((config, source, kwargs))
        grid = tmp_path / "grid.png"
        grid.write_bytes(b"png")
        return pipeline.PipelineResult("promoted", "v1 is the new @champion", grid=str(grid), champion_version="1")

    monkeypatch.setattr(pipeline, "run_pipeline", fake)
    return calls


def test_cli_pipeline_no_prefect_merges_overrides(fake_run_pipeline, tmp_path):
    from typer.testing import CliRunner

    from ddcolor.cli import app

    args = ["pipeline", "--no-prefect", "--force", "--work-dir", str(tmp_path), "train.max_steps=3"]
    result = CliRunner().invoke(app, [*args, "model.pretrained=null", "train.betas=[0.8, 0.9]", "--no-colorize"])
    assert result.exit_code == 0, result.output
    ((config, source, kwargs),) = fake_run_pipeline
    assert config.train.max_steps == 3 and config.model.pretrained is None and config.train.betas == (0.8, 0.9)
    assert config.data.size == load_config("params.yaml").data.size  # the rest from ./params.yaml
    assert source is None and kwargs["force"] and not kwargs["colorize"] and kwargs["work_dir"] == str(tmp_path)
    assert "PROMOTED" in result.output


def test_cli_pipeline_passes_the_ingest_task_runner_to_the_flow(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from ddcolor.cli import app
    from ddcolor.cli import pipeline as pipeline_cli

    seen = {}

    def fake_pipeline(params, no_prefect, progress):
        seen.update(params, no_prefect=no_prefect)

    monkeypatch.setattr(pipeline_cli, "_pipeline", fake_pipeline)
    args = ["pipeline", "--work-dir", str(tmp_path), "--ingest-task-runner", "process"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["ingest_task_runner"] == "process" and not seen["no_prefect"]
    refused = CliRunner().invoke(app, [*args, "--no-prefect"])
    assert refused.exit_code == 2 and "needs the Prefect flow" in refused.output


def test_cli_demo_no_prefect_writes_samples_and_says_where_to_look(fake_run_pipeline, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddcolor.cli import app

    monkeypatch.setenv("DDCOLOR_WEIGHTS_DIR", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(app, ["demo", "--no-prefect", "--out", str(tmp_path / "demo"), "--steps", "7"])
    assert result.exit_code == 0, result.output
    ((config, _, _),) = fake_run_pipeline
    assert config.train.max_steps == 7 and config.model.pretrained is None
    assert config.registry.model_name == "ddcolor-demo" and config.data.size == 128
    assert len(list((tmp_path / "demo" / "data" / "raw").glob("*.jpg"))) == 48
    assert "RANDOM-INIT TRAINING" in result.output and "mlflow ui --backend-store-uri" in result.output
    assert "models:/ddcolor-demo@champion" in result.output and "sample grid" in result.output
    assert "ddcolor ui --registered-model ddcolor-demo" in result.output


# --- the one control flow, with stand-in steps (the whole runs above use the real ones) ------------------------


def _fake_steps(calls: list, champion: ChampionInfo | None, *, promoted: bool = True) -> pipeline.Steps:
    from ddcolor.gates import GateDecision
    from ddcolor.train import TrainResult

    fp = pipeline.Fingerprint("f" * 64, "d" * 64, "c" * 64)

    def step(name, result=None):
        def run(*args, **kwargs):
            calls.append((name, kwargs))
            return result

        return run

    outcome = pipeline.PromotionOutcome(GateDecision(passed=promoted, checks=()), "2", promoted, "2" if promoted else
                                        (champion.version if champion else None), "v2 judged")  # fmt: skip
    return pipeline.Steps(
        ingest=step("ingest"),
        validate=step("validate", "report.md"),
        fingerprint=step("fingerprint", ({"uri": "shards", "rows": 8}, fp, champion)),
        name=lambda config, fp: "train-atto-20260101-000000-" + fp.value[:8],
        train=step("train", TrainResult("m.safetensors", 2, {}, run_id="r" * 32, model_uri="models:/m-1")),
        evaluate=step("evaluate", {"psnr": 20.0, "n_images": 2}),
        promote=step("promote", outcome),
        colorize=step("colorize", ("grid.png", None)),
    )


def test_run_pipeline_calls_its_steps_in_order_and_names_the_run(tmp_path):
    calls: list = []
    cfg = load_config(None)
    result = pipeline.run_pipeline(
        cfg, work_dir=tmp_path, tracking_uri="sqlite:///x.db", steps=_fake_steps(calls, None)
    )
    assert [name for name, _ in calls] == [
        "ingest",
        "validate",
        "fingerprint",
        "train",
        "evaluate",
        "promote",
        "colorize",
    ]
    train = dict(calls)["train"]
    assert train["run_name"] == "train-atto-20260101-000000-ffffffff"
    assert train["out_dir"] == str(tmp_path / "runs" / "train-atto-20260101-000000-ffffffff")
    assert train["tags"]["pipeline.fingerprint"] == "f" * 64
    assert dict(calls)["evaluate"]["out_dir"] == str(tmp_path / "runs" / train["run_name"] / "eval")
    assert (result.status, result.model_version, result.champion_version, result.grid) == (
        "promoted",
        "2",
        "2",
        "grid.png",
    )
    assert result.metrics == {"psnr": 20.0, "n_images": 2} and result.status_message == "promoted: v2 judged"


def test_run_pipeline_skips_and_still_colorizes_with_the_champion_but_not_without_one(tmp_path):
    fp = "f" * 64
    champion = ChampionInfo("1", fp, "d" * 64, "c" * 64, "run")
    calls: list = []
    result = pipeline.run_pipeline(load_config(None), work_dir=tmp_path, steps=_fake_steps(calls, champion))
    assert [name for name, _ in calls] == ["ingest", "validate", "fingerprint", "colorize"]
    assert (
        result.status == "skipped" and result.champion_version == "1" and result.status_message.startswith("skipped: ")
    )
    calls.clear()
    result = pipeline.run_pipeline(
        load_config(None), work_dir=tmp_path, steps=_fake_steps(calls, None, promoted=False)
    )  # gate failed and no champion at all: nothing to colorize with
    assert result.status == "not_promoted" and result.champion_version is None
    assert "colorize" not in [name for name, _ in calls]


def test_progress_is_reported_at_each_log_step():
    from ddcolor.tracking import NullTracker

    seen = []
    cfg = load_config(None, {"train.log_every": 2, "train.max_steps": 5})
    tracker = pipeline._ProgressTracker(NullTracker(), lambda step, total: seen.append((step, total)), cfg)
    for step in range(1, 6):
        tracker.log_metrics({"train/loss_g": 1.0, "train/images_per_s": 3.0}, step=step)
        tracker.log_metrics({"val/psnr": 20.0}, step=step)  # not a training step line
    assert seen == [(2, 5), (4, 5), (5, 5)]
