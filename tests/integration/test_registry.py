"""Gates (pure) and the MLflow model registry (against the real `mlflow_server` fixture, SQLite backend)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from ddcolor.config import GatesConfig, load_config
from ddcolor.gates import GateDecision, decide, normalize_metrics
from ddcolor.registry import (
    LOCK_SUFFIX,
    RegistryError,
    blessing,
    champion_metrics,
    gate_run,
    promote,
    register,
    rollback,
)
from ddcolor.registry_lock import EXPIRES_TAG, RELEASED_TAG, TOKEN_TAG, lease_state

# --- gates (pure) ----------------------------------------------------------------------------------------

STRICT = {"max_fid": 20.0, "min_colorfulness": 25.0, "max_delta_colorfulness": 5.0, "min_psnr": 21.0}
GOOD = {"fid": 15.0, "colorfulness": 30.0, "delta_colorfulness": 2.0, "psnr": 22.0, "n_images": 5000}


@pytest.mark.parametrize(
    ("gates", "metrics", "champion", "passed", "failed_checks"),
    [
        pytest.param({}, GOOD, None, True, set(), id="defaults-no-champion"),
        pytest.param(STRICT, GOOD, None, True, set(), id="thresholds-pass"),
        pytest.param(STRICT, {**GOOD, "fid": 20.5}, None, False, {"max_fid"}, id="fid-too-high"),
        pytest.param(STRICT, {**GOOD, "fid": 20.0}, None, True, set(), id="fid-at-bound"),
        pytest.param(STRICT, {**GOOD, "colorfulness": 24.9}, None, False, {"min_colorfulness"}, id="dull"),
        pytest.param(STRICT, {**GOOD, "delta_colorfulness": 6.0}, None, False, {"max_delta_colorfulness"}, id="dcf"),
        pytest.param(STRICT, {**GOOD, "psnr": 20.0}, None, False, {"min_psnr"}, id="psnr"),
        pytest.param({**STRICT, "min_psnr": None}, {**GOOD, "psnr": 1.0}, None, True, set(), id="psnr-off"),
        pytest.param(STRICT, {k: v for k, v in GOOD.items() if k != "psnr"}, None, False, {"min_psnr"}, id="missing"),
        pytest.param(STRICT, {**GOOD, "psnr": float("nan")}, None, False, {"min_psnr"}, id="nan-is-missing"),
        pytest.param({}, GOOD, {"fid": 14.6, "colorfulness": 31.0}, True, set(), id="within-margins"),
        pytest.param({}, GOOD, {"fid": 14.4, "colorfulness": 31.0}, False, {"fid_vs_champion"}, id="fid-regressed"),
        pytest.param({}, GOOD, {"fid": 15.0, "colorfulness": 32.5}, False, {"colorfulness_vs_champion"}, id="cf-down"),
        pytest.param(
            {"fid_margin_vs_champion": -1.0}, GOOD, {"fid": 15.5, "colorfulness": 30}, False, {"fid_vs_champion"},
            id="must-improve",
        ),
        pytest.param(
            {"fid_margin_vs_champion": None, "colorfulness_margin_vs_champion": None}, GOOD, {"fid": 1.0}, True, set(),
            id="relative-off",
        ),
        pytest.param({}, GOOD, {"colorfulness": 30.0}, False, {"fid_vs_champion"}, id="champion-lacks-metric"),
        pytest.param(STRICT, {**GOOD, "n_images": 2047}, None, False, {"max_fid"}, id="fid-small-sample"),
        pytest.param(
            {**STRICT, "allow_small_fid_sample": True}, {**GOOD, "n_images": 4}, None, True, set(), id="small-allowed"
        ),
        pytest.param(
            {}, {**GOOD, "n_images": 4}, {"fid": 15.0, "colorfulness": 30.0}, False, {"fid_vs_champion"},
            id="fid-vs-champion-small-sample",
        ),
        pytest.param(STRICT, {k: v for k, v in GOOD.items() if k != "n_images"}, None, False, {"max_fid"}, id="no-n"),
        pytest.param(
            STRICT,
            {"val/fid": 15.0, "val/colorfulness": 30.0, "val/delta_colorfulness": 1.0, "val/psnr": 25.0,
             "val/n_images": 2048},
            {"val/fid": 15.0, "val/colorfulness": 30.0}, True, set(), id="val-prefixed",
        ),
    ],
)  # fmt: skip
def test_decide_cases(gates, metrics, champion, passed, failed_checks):
    decision = decide(metrics, GatesConfig(**gates), champion, champion_version="3" if champion else None)
    assert decision.passed is passed
    assert {c.name for c in decision.checks if not c.passed} == failed_checks
    for check in decision.checks:
        assert check.kind == ("vs_champion" if check.name.endswith("_vs_champion") else "absolute")
        assert check.reason
    if champion is None:
        assert all(c.kind == "absolute" for c in decision.checks)


def test_decision_reasons_table_and_round_trip():
    decision = decide(
        {"fid": 16.0, "n_images": 4096}, GatesConfig(min_psnr=20.0), {"fid": 15.0, "colorfulness": 30.0}, "7"
    )
    by_name = {c.name: c for c in decision.checks}
    assert by_name["min_psnr"].reason == "metric 'psnr' missing" and by_name["min_psnr"].value is None
    assert by_name["fid_vs_champion"].threshold == pytest.approx(15.5)
    assert by_name["fid_vs_champion"].champion_value == 15.0 and not by_name["fid_vs_champion"].passed
    assert "missing" in by_name["colorfulness_vs_champion"].reason
    table = decision.table()
    assert table.startswith("**Gate FAILED** (champion v7; 0/3 checks passed)")
    assert "| fid_vs_champion | vs_champion | fid | 4096 | 16 | <= | 15.5 | 15 | - | FAIL |" in table
    data = json.loads(json.dumps(decision.to_dict()))
    assert data["passed"] is False and data["champion_version"] == "7" and len(data["checks"]) == 3
    assert GateDecision.from_dict(data) == decision
    empty = decide({}, GatesConfig(fid_margin_vs_champion=None, colorfulness_margin_vs_champion=None), None)
    assert empty.passed and empty.checks == () and "no gate enabled" in empty.table()


def test_normalize_metrics():
    got = normalize_metrics({"val/fid": 2, "fid": 1, "n_images": 3, "note": "x", "flag": True, "x": float("nan")})
    assert got == {"fid": 1.0, "n_images": 3.0}


# --- registry (real MLflow server) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged_model(mlflow_server, tmp_path_factory):
    """(run_id, models:/m-... URI, generator) of a small atto generator logged once for the module."""
    import torch

    from ddcolor.model import build_model
    from ddcolor.model.checkpoint import save_checkpoint
    from ddcolor.tracking import MlflowTracker

    mlflow_server.start()
    torch.manual_seed(0)
    small = {"nf": 64, "hidden_dim": 64, "nheads": 4, "dim_feedforward": 128, "dec_layers": 1, "num_queries": 8}
    model = build_model("atto", pretrained=None, **small).eval()
    checkpoint = save_checkpoint(model, tmp_path_factory.mktemp("reg") / "generator", extra={"step": 1})
    tracker = MlflowTracker(mlflow_server.uri, experiment="test-registry", log_system_metrics=False)
    uri = tracker.log_model(checkpoint)
    tracker.finish()
    return tracker.run_id, uri, model


@pytest.fixture
def env(mlflow_server, logged_model, monkeypatch):
    """Config with a unique registered-model name and strict-ish gates, no ONNX export per version (one test asks
    for it); MLFLOW_TRACKING_URI -> the server."""
    mlflow_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    name = f"ddcolor-test-{uuid.uuid4().hex[:8]}"
    overrides = {"registry.model_name": name, "gates.max_fid": 30.0, "gates.min_psnr": 20.0}
    cfg = load_config(None, overrides=overrides | {"registry.export_onnx": False})
    return cfg


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _run(logged_model, metrics: dict[str, float], dataset: str = "ab" * 32) -> str:
    """A finished run with val/* metrics, dataset and git tags, and the module's model as its ddcolor.model_uri."""
    client = _client()
    experiment = client.get_experiment_by_name("test-registry").experiment_id
    run = client.create_run(experiment)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, f"val/{key}", value, step=1)
    tags = {"ddcolor.model_uri": logged_model[1], "git.commit": "c0ffee" * 6 + "abcd", "git.dirty": "false"}
    tags |= {"dataset.manifest_sha256": dataset, "dataset.rows": "12", "dataset.dvc_md5": ""}
    tags |= {"eval.dataset_sha256": dataset, "eval.config_sha256": "cf" * 32}  # all measured on the same data
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _good(fid: float = 15.0) -> dict[str, float]:
    return {"fid": fid, "colorfulness": 30.0, "delta_colorfulness": 2.0, "psnr": 22.0, "n_images": 5000.0}


def _promote_run(logged_model, cfg, metrics) -> tuple[str, str, object]:
    run_id = _run(logged_model, metrics)
    version = register(run_id, None, cfg)  # cfg.registry.export_onnx: off but in one test (~35 s CPU an export)
    decision = gate_run(run_id, cfg)
    return run_id, version, promote(version, decision, cfg)


def test_register_and_promote_sets_champion_with_lineage(env, logged_model):
    cfg = env
    name = cfg.registry.model_name
    assert champion_metrics(cfg) is None
    run_id = _run(logged_model, _good())
    version = register(run_id, None, cfg)
    client = _client()
    assert client.get_model_version_by_alias(name, "challenger").version == version
    assert "onnx_artifact" not in client.get_model_version(name, version).tags  # registry.export_onnx: false
    decision = gate_run(run_id, cfg)
    assert decision.passed and decision.champion_version is None
    assert {c.name for c in decision.checks} == {"max_fid", "min_psnr"}  # no champion: thresholds only
    result = promote(version, decision, cfg)
    assert result.promoted and result.champion == version and result.previous_champion is None

    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == version and mv.run_id == run_id
    tags = mv.tags
    assert tags["lineage.run_id"] == run_id and tags["lineage.model_uri"] == logged_model[1]
    assert tags["git.commit"] == "c0ffee" * 6 + "abcd" and tags["git.dirty"] == "false"
    assert tags["dataset.manifest_sha256"] == "ab" * 32 and tags["dataset.rows"] == "12"
    assert float(tags["metric.fid"]) == 15.0 and float(tags["metric.psnr"]) == 22.0
    assert "previous_champion" not in tags
    assert blessing(tags).passed is True
    assert champion_metrics(cfg) == (version, _good())
    run = client.get_run(run_id)
    assert run.data.tags["gate.passed"] == "true"
    assert json.loads(run.data.tags["gate.checks"])["passed"] is True
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["gate.md"]  # no ONNX (test_champion_loads...)
    assert lease_state(client, name)[RELEASED_TAG] == "true"  # lock released

    # a second, better challenger is gated against the champion and replaces it
    _, v2, second = _promote_run(logged_model, cfg, _good(fid=14.0))
    assert second.promoted and second.previous_champion == version
    mv2 = client.get_model_version_by_alias(name, "champion")
    assert mv2.version == v2 and mv2.tags["previous_champion"] == version
    assert blessing(mv2.tags).champion_version == version
    assert {c.kind for c in blessing(mv2.tags).checks} == {"absolute", "vs_champion"}


def test_failed_gate_keeps_champion(env, logged_model):
    cfg = env
    name = cfg.registry.model_name
    _, v1, _ = _promote_run(logged_model, cfg, _good())
    run_id, v2, result = _promote_run(logged_model, cfg, _good(fid=25.0))  # below max_fid but >> champion + 0.5
    assert not result.promoted and result.champion == v1
    client = _client()
    assert client.get_model_version_by_alias(name, "champion").version == v1
    assert client.get_model_version_by_alias(name, "challenger").version == v2
    failed = blessing(client.get_model_version(name, v2).tags)
    assert failed.passed is False and [c.name for c in failed.checks if not c.passed] == ["fid_vs_champion"]
    assert client.get_run(run_id).data.tags["gate.passed"] == "false"
    # an absolute failure with no champion never creates one either
    cfg2 = cfg.with_overrides({"registry.model_name": name + "-b"})
    _, _, result = _promote_run(logged_model, cfg2, _good(fid=35.0))
    assert not result.promoted and result.champion is None and champion_metrics(cfg2) is None


def test_rollback_moves_champion_back(env, logged_model):
    cfg = env
    name = cfg.registry.model_name
    with pytest.raises(RegistryError, match="no 'champion' alias"):
        rollback(cfg)
    _, v1, _ = _promote_run(logged_model, cfg, _good())
    with pytest.raises(RegistryError, match="previous_champion"):
        rollback(cfg)
    _, v2, _ = _promote_run(logged_model, cfg, _good(fid=14.8))
    result = rollback(cfg)
    assert result.champion == v1 and result.previous_champion == v2
    client = _client()
    assert client.get_model_version_by_alias(name, "champion").version == v1
    assert client.get_model_version(name, v2).tags["rolled_back"] == "true"
    assert champion_metrics(cfg) == (v1, _good())


def test_racing_promotions_stay_consistent(env, logged_model):
    cfg = env
    name = cfg.registry.model_name
    _, v0, _ = _promote_run(logged_model, cfg, _good())
    versions, decisions = [], []
    for fid in (14.9, 14.8):
        run_id = _run(logged_model, _good(fid))
        versions.append(register(run_id, None, cfg, attach_onnx=False))
        decisions.append(gate_run(run_id, cfg))
    assert all(d.passed for d in decisions)
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = promote(versions[i], decisions[i], cfg)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and all(r.promoted for r in results.values())
    client = _client()
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version in versions
    assert blessing(champion.tags).passed
    other = versions[1 - versions.index(champion.version)]
    # serialized: v0 <- other <- champion (without the lock both would name v0)
    assert champion.tags["previous_champion"] == other
    assert client.get_model_version(name, other).tags["previous_champion"] == v0
    holders = [v.version for v in client.search_model_versions(f"name = '{name}'") if "champion" in
               client.get_model_version(name, v.version).aliases]  # fmt: skip
    assert holders == [champion.version]
    state = lease_state(client, name)
    assert state[RELEASED_TAG] == "true" and state["generation"] >= 3  # one generation per promotion, serialized
    assert len(client.search_registered_models(f"name LIKE '{name}{LOCK_SUFFIX}.%'")) == 1  # older ones deleted


def test_champion_loads_as_pyfunc_and_predicts(env, logged_model, tmp_path):
    import mlflow
    import torch

    from ddcolor.colorize import Colorizer
    from ddcolor.export import OnnxColorModel

    cfg = load_config(None, overrides={"registry.model_name": env.registry.model_name})  # export_onnx: true
    assert cfg.registry.export_onnx
    run_id, _, _ = _promote_run(logged_model, cfg, _good())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    got = pyfunc.predict(images, params={"input_size": 64})
    expected = Colorizer(logged_model[2], input_size=64, device="cpu").colorize_batch(list(images))
    assert got.dtype == np.uint8 and got.shape == (2, 40, 56, 3)
    assert np.abs(got.astype(int) - np.stack(expected).astype(int)).max() <= 1
    # the network contract (float32 gray RGB -> ab) and gray images, past the image-only signature
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    raw = pyfunc.unwrap_python_model()
    with torch.inference_mode():
        expected_ab = logged_model[2](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(raw.predict(None, x), expected_ab, atol=1e-5)
    assert raw.predict(None, images[..., 0], params={"input_size": 64}).shape == (2, 40, 56, 3)
    # the ONNX artifact of the version gives the same ab
    onnx_uri = _client().get_model_version_by_alias(cfg.registry.model_name, "champion").tags["onnx_artifact"]
    assert onnx_uri == f"runs:/{run_id}/onnx/generator.onnx"
    local = mlflow.artifacts.download_artifacts(artifact_uri=onnx_uri, dst_path=str(tmp_path))
    np.testing.assert_allclose(OnnxColorModel(local).run_numpy(x), expected_ab, atol=1e-4)
    # the same champion through ddcolor's own loader (`ddcolor colorize --model models:/NAME@champion`, `--init`)
    from ddcolor.colorize import load_colorization_model

    generator = load_colorization_model(f"models:/{cfg.registry.model_name}@champion")
    with torch.inference_mode():
        np.testing.assert_allclose(generator(torch.from_numpy(x)).numpy(), expected_ab, atol=1e-6)


def test_cli_gate_and_promote(env, logged_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ddcolor.cli import app

    cfg = env
    name = cfg.registry.model_name
    params = tmp_path / "params.yaml"
    params.write_text(cfg.to_yaml())
    runner = CliRunner()
    run_id = _run(logged_model, _good())

    res = runner.invoke(app, ["gate", "--run-id", run_id, "--config", str(params)])
    assert res.exit_code == 0, res.output
    assert "Gate PASSED" in res.output and "| max_fid |" in res.output
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"fid": 99.0, "colorfulness": 30.0, "psnr": 25.0, "n_images": 4}))
    res = runner.invoke(app, ["gate", "--run-id", run_id, "--metrics", str(bad), "--config", str(params), "--json"])
    assert res.exit_code == 1 and "Gate FAILED" in res.stderr
    doc = json.loads(res.stdout)  # --json: one document on stdout
    assert doc["passed"] is False and doc["run_id"] == run_id and doc["checks"]
    assert _client().get_run(run_id).data.tags["gate.passed"] == "false"

    res = runner.invoke(app, ["promote", "--run-id", run_id, "--config", str(params)])
    assert res.exit_code == 0, res.output
    v1 = _client().get_model_version_by_alias(name, "champion").version
    run2 = _run(logged_model, _good(fid=14.0))
    res = runner.invoke(app, ["promote", "--run-id", run2, "--config", str(params)])
    assert res.exit_code == 0, res.output
    assert "promoted" in res.output
    run3 = _run(logged_model, _good(fid=29.0))
    res = runner.invoke(app, ["promote", "--run-id", run3, "--config", str(params), "--json"])
    assert res.exit_code == 1 and "not promoted" in res.stderr
    doc = json.loads(res.stdout)
    assert (doc["decision"], doc["promoted"], doc["gate_passed"], doc["run_id"]) == ("rejected", False, False, run3)
    res = runner.invoke(app, ["promote", "--rollback", "--config", str(params)])
    assert res.exit_code == 0, res.output
    assert _client().get_model_version_by_alias(name, "champion").version == v1
    res = runner.invoke(app, ["promote", "--rollback", "--config", str(params)])
    assert res.exit_code == 1 and "previous_champion" in res.output
    res = runner.invoke(app, ["promote", "--config", str(params)])
    assert res.exit_code == 2


# --- the promotion lock with real processes (#18) --------------------------------------------------------------

_PROMOTER = textwrap.dedent(
    """
    # argv: tracking URI, model name, version, ttl, stall ("stall": SIGSTOP itself inside the lock, before the move)
    import json, os, signal, sys
    import mlflow
    from ddcolor.config import load_config
    from ddcolor.gates import GateDecision
    from ddcolor import registry

    uri, name, version, ttl, mode = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
    cfg = load_config(None, overrides={"registry.model_name": name})
    if mode == "stall":
        original = mlflow.MlflowClient.set_model_version_tag

        def stall_once(self, *args, **kwargs):
            if not getattr(stall_once, "done", False):
                stall_once.done = True
                print("stalling", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen, heartbeat included, until the test sends SIGCONT
            return original(self, *args, **kwargs)

        mlflow.MlflowClient.set_model_version_tag = stall_once
    real_lock = registry.promotion_lock

    def lock(config, **kwargs):
        return real_lock(config, **{**kwargs, "lock_ttl_s": ttl, "poll_s": 0.1})

    registry.promotion_lock = lock
    decision = GateDecision(passed=True, checks=[])
    try:
        result = registry.promote(version, decision, cfg, tracking_uri=uri, lock_timeout_s=120)
    except registry.RegistryError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        sys.exit(1)
    print(json.dumps({"promoted": result.promoted, "previous": result.previous_champion}), flush=True)
    """
)

_RACER = textwrap.dedent(
    """
    # argv: tracking URI, model name, go file, hold seconds, timeout seconds
    import json, os, sys, time
    import mlflow
    from ddcolor.registry_lock import LockTimeoutError, promotion_lock

    uri, name, go, hold, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models(max_results=1)  # connection warm
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        with promotion_lock(client, name, timeout_s=timeout, ttl_s=60, poll_s=0.05) as lease:
            start = time.time()
            time.sleep(hold)
            lease.check()
            print(json.dumps({"won": lease.generation, "start": start, "end": time.time()}), flush=True)
    except LockTimeoutError:
        print(json.dumps({"won": None}), flush=True)
    """
)


def _spawn(script: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow
def test_holder_stalled_past_the_ttl_is_fenced_off(env, logged_model, mlflow_server, tmp_path):
    """Holder A freezes (SIGSTOP: no heartbeat) inside the lock for longer than the TTL while B waits. B takes over
    and promotes; when A wakes up, its fencing check fails and it moves nothing: one champion, the chain v0 <- B."""
    cfg = env
    name = cfg.registry.model_name
    _, v0, _ = _promote_run(logged_model, cfg, _good())
    va, vb = (register(_run(logged_model, _good(f)), None, cfg, attach_onnx=False) for f in (14.9, 14.8))
    script = tmp_path / "promoter.py"
    script.write_text(_PROMOTER)
    a = _spawn(script, mlflow_server.uri, name, va, "3", "stall")
    deadline = time.monotonic() + 120
    while not _stopped(a.pid):
        assert a.poll() is None, a.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "A never stalled inside the lock"
        time.sleep(0.05)
    client = _client()
    held = lease_state(client, name)
    assert held[TOKEN_TAG] and RELEASED_TAG not in held  # A holds it (frozen)
    b = _spawn(script, mlflow_server.uri, name, vb, "3", "run")
    out_b, err_b = b.communicate(timeout=180)  # waits for A's lease (3 s) to expire, then takes over
    assert b.returncode == 0, err_b[-3000:]
    assert _last_json(out_b) == {"promoted": True, "previous": v0}
    assert float(lease_state(client, name)[EXPIRES_TAG]) > 0
    os.kill(a.pid, signal.SIGCONT)
    out_a, err_a = a.communicate(timeout=120)
    assert a.returncode == 1, err_a[-3000:]
    assert "lease expired" in _last_json(out_a)["error"] or "taken over" in _last_json(out_a)["error"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == vb and champion.tags["previous_champion"] == v0
    assert "previous_champion" not in client.get_model_version(name, va).tags  # A left no wrong chain behind
    holders = [v.version for v in client.search_model_versions(f"name = '{name}'") if "champion" in
               client.get_model_version(name, v.version).aliases]  # fmt: skip
    assert holders == [vb]


@pytest.mark.slow
def test_three_processes_racing_for_an_expired_lock_one_wins(env, mlflow_server, tmp_path):
    cfg = env
    name = cfg.registry.model_name
    client = _client()
    # a crashed holder's generation: lease long expired, never released
    client.create_registered_model(
        f"{name}{LOCK_SUFFIX}.{1:010d}", tags={TOKEN_TAG: "crashed", EXPIRES_TAG: repr(time.time() - 600)}
    )
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    go = tmp_path / "go"
    racers = [_spawn(script, mlflow_server.uri, name, str(go), "4", "2") for _ in range(3)]
    for proc in racers:  # all imported and connected, then released at once
        assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-3000:]
    go.touch()
    results = []
    for proc in racers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(_last_json(out))
    winners = [r for r in results if r["won"] is not None]
    assert len(winners) == 1 and winners[0]["won"] == 2  # exactly one created generation 2; the others timed out
    assert lease_state(client, name)["generation"] == 2
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}.{1:010d}'")  # the winner cleaned up
