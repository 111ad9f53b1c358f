"""The MLflow UI as its users expect: the experiment the platform creates opens on the training runs, named after what
they are (issue #20). Real `mlflow server` (sqlite) and MLflow's own web UI in headless Debian Chromium."""

from __future__ import annotations

import pytest

from ddcolor.config import load_config
from ddcolor.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, start_tracker
from ddcolor.tracking.client import run_url, ui_fragment

pytestmark = pytest.mark.slow


def test_experiment_opens_on_the_runs_table(mlflow_server, browser, tmp_path):
    import mlflow

    cfg = load_config(None, {"registry.experiment_name": "ui-opens-on-runs", "data.shards_uri": str(tmp_path / "none")})
    names = []
    for steps in (10, 20):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": steps})})
        tracker = start_tracker(cfg, tracking_uri=mlflow_server.uri, log_system_metrics=False)
        tracker.log_metrics({"train/loss": 1.0 / steps}, step=steps)
        tracker.finish("FINISHED")
        names.append(mlflow.MlflowClient(mlflow_server.uri).get_run(tracker.run_id).info.run_name)
    # no dataset manifest here, so the name is <preset>-<size>px-<steps>steps without the hash suffix
    assert names == [f"{cfg.model.preset}-{cfg.data.size}px-{s}steps" for s in (10, 20)]
    experiment = mlflow.MlflowClient(mlflow_server.uri).get_experiment_by_name("ui-opens-on-runs")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    # The link the platform prints (run_url, the demo, the playground) opens the experiment's runs table: MLflow 3.17
    # would otherwise open the GenAI overview (traces, tokens), whatever the experiment's kind tag says.
    page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{mlflow_server.uri}/{ui_fragment(experiment.experiment_id)}")
    page.get_by_text("Run Name", exact=True).first.wait_for(state="visible")
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for(state="visible")
    assert "workflowType=machine_learning" in page.url and "/runs" in page.url
    assert run_url(tracker.run_id, tracking_uri=mlflow_server.uri).endswith(
        ui_fragment(experiment.experiment_id, tracker.run_id)
    )
