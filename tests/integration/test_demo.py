"""`ddcolor demo` carries its whole recipe: a params.yaml in the working directory changes nothing that reaches the
trainer, and the user is told up front how long the run will take here. The pipeline itself is not run (patched)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ddcolor import demo

HOSTILE = """\
model:
  preset: large
  input_size: 512
data:
  size: 512
  num_workers: 8
train:
  batch_size: 16
  amp: fp16
  max_steps: 400000
eval:
  image_size: 512
"""


class Captured(Exception):
    """Raised by the patched pipeline entry once it has the config."""


@pytest.fixture
def hostile_cwd(tmp_path, monkeypatch):
    """An otherwise empty working directory whose params.yaml asks for the large preset at batch 16, 512 px."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(HOSTILE)
    written = []
    monkeypatch.setattr("ddcolor.data.samples.write_samples", lambda out, count: written.append((out, count)))
    monkeypatch.setattr(demo, "time_training_step", lambda config: 1.25)  # s per step; the real one trains a step
    return tmp_path, written


def _run_demo(monkeypatch, *args):
    seen = {}

    def fake_run_pipeline(cfg, source, **kwargs):
        seen["cfg"], seen["kwargs"] = cfg, kwargs
        raise Captured

    monkeypatch.setattr("ddcolor.pipeline.run_pipeline", fake_run_pipeline)
    from ddcolor.cli import app

    result = CliRunner().invoke(app, ["demo", "--no-prefect", "--out", "out", *args])
    assert isinstance(result.exception, Captured), result.output
    return seen["cfg"], result.output


def test_the_demo_recipe_ignores_a_params_yaml_in_the_working_directory(hostile_cwd, monkeypatch):
    _, written = hostile_cwd
    cfg, output = _run_demo(monkeypatch)
    assert cfg.model.preset == "atto" == demo.PIPELINE_DEMO_PRESET
    assert cfg.train.batch_size == 4 == demo.PIPELINE_DEMO_BATCH
    assert cfg.data.size == cfg.eval.image_size == demo.PIPELINE_DEMO_SIZE == 128
    assert cfg.model.input_size == demo.PIPELINE_DEMO_INPUT_SIZE
    assert cfg.train.max_steps == demo.PIPELINE_DEMO_STEPS and cfg.train.amp == "auto"
    assert cfg.data.num_workers == 0 and cfg.data.shards_uri == "out/data/shards"
    assert written == [("out/data/raw", demo.PIPELINE_DEMO_IMAGES)]
    # told up front: 80 steps x 1.25 s + the rest of the pipeline
    total = demo.PIPELINE_DEMO_STEPS * 1.25 + demo.PIPELINE_DEMO_OTHER_S
    assert f"the demo takes about {demo.format_duration(total)}" in output
    assert "training 80 steps of atto (128 px, batch 4) about 1 min 40 s" in output


def test_the_demo_precision_option_sets_train_amp(hostile_cwd, monkeypatch):
    cfg, output = _run_demo(monkeypatch, "--precision", "fp32", "--steps", "7")
    assert cfg.train.amp == "none" and cfg.train.max_steps == 7 and cfg.model.preset == "atto"
    assert "train.amp=none -> none" in output


def test_the_flow_parameters_name_no_config_file(hostile_cwd):
    params, _ = demo.pipeline_demo_params("out", steps=3)
    assert params["config_path"] is None  # the flow then starts from the built-in defaults, not ./params.yaml
    cfg = demo.pipeline_demo_config(params)  # what the flow builds from them
    assert (cfg.model.preset, cfg.train.batch_size, cfg.train.max_steps) == ("atto", 4, 3)


@pytest.mark.parametrize(("seconds", "text"), [(42, "42 s"), (60, "1 min 00 s"), (134.4, "2 min 14 s")])
def test_format_duration(seconds, text):
    assert demo.format_duration(seconds) == text
