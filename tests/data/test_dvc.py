"""DVC versioning: the samples -> ingest -> validate pipeline, the S3 remote, dataset versions for lineage.

The pipeline tests run the real `dvc` CLI in a throw-away git repository under ``tmp_path`` (a copy of this
repository's dvc.yaml, params.yaml with small overrides, .dvc/config and the ddcolor sources the stages depend on),
never in the repository itself. The remote is the committed one (``s3://ddcolor-data/dvc``) on the moto server;
DVC finds moto through ``AWS_ENDPOINT_URL`` alone, as a user finds MinIO.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from ddcolor import storage
from ddcolor.cli import app
from ddcolor.config import Config
from ddcolor.data.samples import MAX_SIDE, MIN_SIDE, available_photos, sample_images, write_samples
from ddcolor.data.version import dataset_version
from tests.helpers.recipes import tiny_recipe
from tests.helpers.servers import make_bucket

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REMOTE_BUCKET = "ddcolor-data"
COUNT = 12  # sample images in the test pipeline
UP_TO_DATE = "Data and pipelines are up to date"


# --- samples ---------------------------------------------------------------------------------------------


def test_sample_photos_load_offline():
    photos = available_photos()
    assert {"astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"} <= set(photos)


def test_sample_images_are_deterministic_distinct_jpegs():
    first = sample_images(12)
    again = sample_images(12)
    assert [s.data for s in first] == [s.data for s in again]
    assert len({s.sha256 for s in first}) == 12
    assert [s.data for s in sample_images(3)] == [s.data for s in first[:3]]  # image i does not depend on count
    n_photos = len(available_photos())
    assert [s.variant for s in first[:n_photos]] == [0] * n_photos and first[n_photos].variant == 1
    for s in first:
        with Image.open(io.BytesIO(s.data)) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (s.width, s.height)
            assert not im.getexif()
        assert max(s.width, s.height) <= MAX_SIDE
        if s.variant:
            assert max(s.width, s.height) >= MIN_SIDE
    with pytest.raises(ValueError):
        sample_images(0)


def test_write_samples_and_cli(tmp_path):
    out = tmp_path / "raw"
    (out).mkdir()
    (out / "mine.jpg").write_bytes(b"not a sample")
    written = write_samples(out, 10)
    assert len(written) == 10 and all(Path(p).is_file() for p in written)
    result = CliRunner().invoke(app, ["samples", "--out", str(out), "--count", "4"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000_astronaut.jpg", "0001_coffee.jpg", "0002_chelsea.jpg", "0003_rocket.jpg", "mine.jpg"]
    assert (out / "0000_astronaut.jpg").read_bytes() == sample_images(1)[0].data


# --- the pipeline definition -----------------------------------------------------------------------------


def _out_paths(stage: dict) -> list[str]:
    """Every out of a stage: outs, metrics and plots (plain strings or one-key mappings)."""
    entries = [*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])]
    return [next(iter(o)) if isinstance(o, dict) else o for o in entries]


def test_dvc_yaml_stages_and_remote():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["samples", "ingest", "validate", "train", "evaluate", "promote", "colorize"]
    assert stages["ingest"]["cmd"].startswith("ddcolor ingest data/raw --dest data/shards --config params.yaml")
    assert "data/raw" in stages["ingest"]["deps"] and stages["ingest"]["outs"] == ["data/shards"]
    assert stages["samples"]["outs"] == ["data/raw"] and "data/shards" in stages["validate"]["deps"]
    assert stages["train"]["cmd"][0].startswith("ddcolor train --data data/shards --out models/train")
    assert "reports/validation/validation.json" in stages["train"]["deps"]  # `dvc repro train` validates first
    assert {"model", "train"} <= set(stages["train"]["params"])  # whole sections: `dvc exp run -S train.lr=...`
    assert "--run-id model" in stages["evaluate"]["cmd"] and "eval" in stages["evaluate"]["params"]
    assert "--model models/train/model.safetensors --out reports/promotion.json" in stages["promote"]["cmd"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    Config.model_validate(params)
    produced: set[str] = set()
    for name, stage in stages.items():
        for key in stage.get("params", []):
            section, _, field = key.partition(".")
            assert section in params and (not field or field in params[section]), f"{name}: params.yaml has no {key}"
        for dep in stage.get("deps", []):
            assert dep in produced or (ROOT / dep).exists(), f"{name}: dep {dep} is neither a file nor an earlier out"
        produced.update(_out_paths(stage))
    for stage in stages.values():  # no stage writes into another stage's out
        for other in stages.values():
            if other is not stage:
                for path in _out_paths(other):
                    assert all(out != path and not out.startswith(path + "/") for out in _out_paths(stage))
    config = (ROOT / ".dvc" / "config").read_text()
    assert "url = s3://ddcolor-data/dvc" in config and "remote = storage" in config
    assert "endpointurl" not in config and "secret" not in config  # endpoint and credentials: environment only


def test_jsonl_to_json_for_dvc_plots(tmp_path):
    from ddcolor.train.curves import jsonl_to_json, main

    src = tmp_path / "metrics.jsonl"
    src.write_text('{"step": 2, "loss_g": 1.5}\n\n{"step": 1, "loss_g": 2.5}\n')
    assert jsonl_to_json(src, tmp_path / "plots" / "loss.json") == 2
    assert json.loads((tmp_path / "plots" / "loss.json").read_text()) == [
        {"step": 1, "loss_g": 2.5},
        {"step": 2, "loss_g": 1.5},
    ]
    src.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        jsonl_to_json(src, tmp_path / "bad.json")
    assert main([]) == 2


# --- the pipeline, end to end ----------------------------------------------------------------------------


class Shell:
    """Runs git and dvc in a given folder with an isolated environment (AWS_* from ``s3_env``, venv on PATH)."""

    def __init__(self, tmp: Path) -> None:
        self.env = dict(os.environ)
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}",  # stages call `ddcolor`
            DVC_NO_ANALYTICS="1",
            DVC_SITE_CACHE_DIR=str(tmp / "dvc-site"),
            DVC_GLOBAL_CONFIG_DIR=str(tmp / "dvc-global"),
            DVC_SYSTEM_CONFIG_DIR=str(tmp / "dvc-system"),
            GIT_AUTHOR_NAME="test",
            GIT_AUTHOR_EMAIL="test@example.com",
            GIT_COMMITTER_NAME="test",
            GIT_COMMITTER_EMAIL="test@example.com",
            GIT_CONFIG_NOSYSTEM="1",
        )

    def run(self, cwd: Path, *cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def git(self, cwd: Path, *args: str) -> str:
        return self.run(cwd, "git", *args)

    def dvc(self, cwd: Path, *args: str) -> str:
        return self.run(cwd, str(BIN / "dvc"), *args)


def _set_params(repo: Path, **data) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(data)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _project(sh: Shell, dest: Path, count: int) -> Path:
    """A git repository with this project's pipeline, small parameters and the sources the stages depend on."""
    dest.mkdir(parents=True)
    for name in ("params.yaml", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "data/.gitignore"):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "ddcolor", dest / "ddcolor", ignore=shutil.ignore_patterns("__pycache__"))
    dvc_yaml = (ROOT / "dvc.yaml").read_text()
    assert "--count 48" in dvc_yaml
    (dest / "dvc.yaml").write_text(dvc_yaml.replace("--count 48", f"--count {count}"))
    _set_params(dest, size=64, shard_rows=4, num_workers=0)
    sh.git(dest, "init", "-q")
    sh.git(dest, "add", "-A")
    sh.git(dest, "commit", "-q", "-m", "pipeline")
    return dest


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _lock_md5(repo: Path, stage: str) -> str:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


@pytest.mark.slow
def test_repro_push_pull_and_lineage(s3_env, s3_server, tmp_path):
    sh = Shell(tmp_path)
    make_bucket(s3_server.endpoint_url, REMOTE_BUCKET)
    repo = _project(sh, tmp_path / "repo", COUNT)

    # first repro: the whole chain; reports land in reports/, not in data/shards
    out = sh.dvc(repo, "repro", "validate")
    assert _ran(out) == ["samples", "ingest", "validate"], out
    assert len(list((repo / "data" / "raw").glob("*.jpg"))) == COUNT
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == COUNT and manifest["counts"]["shards"] == 3
    assert not (repo / "data" / "shards" / "validation.json").exists()
    assert json.loads((repo / "reports" / "validation" / "validation.json").read_text())["success"] is True
    assert "PASS" in (repo / "reports" / "validation" / "validation_report.md").read_text()
    assert "data/" not in sh.git(repo, "status", "--porcelain", "--untracked-files=all")  # git-ignored

    # nothing changed: nothing runs
    out = sh.dvc(repo, "repro", "validate")
    assert UP_TO_DATE in out and not _ran(out)

    # lineage: the DVC md5 of data/shards
    version = dataset_version(repo / "data" / "shards", repo=repo)
    assert version.dvc_md5 == _lock_md5(repo, "ingest") and version.dvc_md5.endswith(".dir")
    assert version.rows == COUNT

    # push to S3 (moto found through AWS_ENDPOINT_URL only), then a fresh clone pulls identical files
    sh.git(repo, "add", "-A")
    sh.git(repo, "commit", "-q", "-m", "data")
    out = sh.dvc(repo, "push")
    keys = [k for k in _list_keys(REMOTE_BUCKET) if k.startswith("dvc/files/md5/")]
    assert len(keys) >= COUNT + 3 + 2, out  # images, shards, manifest/quarantine, .dir listings
    clone = tmp_path / "clone"
    sh.git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data" / "shards").exists()
    # only the data stages ran here: pull their outs (a bare `dvc pull` also wants the never-built model outs)
    sh.dvc(clone, "pull", "ingest", "--with-deps")
    for folder in ("data/raw", "data/shards"):
        assert _hashes(clone / folder) == _hashes(repo / folder) != {}
    cloned = dataset_version(clone / "data" / "shards", repo=clone)
    assert (cloned.manifest_sha256, cloned.dvc_md5, cloned.rows) == (
        version.manifest_sha256,
        version.dvc_md5,
        version.rows,
    )
    assert UP_TO_DATE in sh.dvc(clone, "status", "validate")  # (train and later stages never ran here)

    # a changed ingest parameter re-runs ingest and validate only (DVC clears data/shards first)
    _set_params(repo, min_colorfulness=5.0)
    out = sh.dvc(repo, "repro", "validate")
    assert _ran(out) == ["ingest", "validate"], out
    manifest = json.loads((repo / "data" / "shards" / "manifest.json").read_text())
    assert manifest["config"]["min_colorfulness"] == 5.0 and manifest["counts"]["rows"] == COUNT
    changed = dataset_version(repo / "data" / "shards", repo=repo)
    assert changed.dvc_md5 == _lock_md5(repo, "ingest") != version.dvc_md5
    assert changed.manifest_sha256 != version.manifest_sha256


def _list_keys(bucket: str) -> list[str]:
    client = storage.s3_client()
    return [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]


def test_promote_and_gate_take_the_run_from_a_checkpoint(tmp_path):
    """`--model PATH` (what the promote stage passes) reads the run id from the checkpoint's JSON sidecar."""
    runner = CliRunner()
    untracked = tmp_path / "model.safetensors"
    untracked.write_bytes(b"")
    (tmp_path / "model.json").write_text(json.dumps({"extra": {}}))
    for command in ("promote", "gate"):
        result = runner.invoke(app, [command, "--model", str(untracked)])
        assert result.exit_code == 1 and "records no MLflow run" in result.output, result.output
        result = runner.invoke(app, [command, "--model", str(untracked), "--run-id", "abc"])
        assert result.exit_code == 2 and "exactly one of" in result.output
    result = runner.invoke(app, ["promote", "--rollback", "--model", str(untracked)])
    assert result.exit_code == 2


# --- train -> evaluate -> promote -> colorize, end to end -------------------------------------------------

#: The shared tiny recipe (tests.helpers.recipes), with DVC's extras: small shards, 64 px colorize stage, no
#: checkpoints.
TINY_PARAMS = tiny_recipe(
    data={"shard_rows": 4, "val_fraction": 0.3},
    model={"input_size": 64},
    train={"checkpoint_every": 100000},
    eval={"batch_size": 4},
)
ALL_STAGES = ["samples", "ingest", "validate", "train", "evaluate", "promote", "colorize"]


def _set_sections(repo: Path, sections: dict[str, dict]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_repro_trains_evaluates_promotes_then_does_nothing(tmp_path):
    import mlflow

    sh = Shell(tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sh.env.update(
        MLFLOW_TRACKING_URI=tracking_uri, GX_ANALYTICS_ENABLED="false", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false"
    )
    sh.env.pop("AWS_ENDPOINT_URL", None)
    repo = _project(sh, tmp_path / "repo", COUNT)
    _set_sections(repo, TINY_PARAMS)
    sh.git(repo, "commit", "-q", "-am", "tiny params")

    out = sh.dvc(repo, "repro")
    assert sorted(_ran(out)) == sorted(ALL_STAGES), out
    model = repo / "models" / "train" / "model.safetensors"
    assert model.is_file() and (repo / "models" / "train" / "model.json").is_file()
    curves = json.loads((repo / "models" / "train" / "loss.json").read_text())
    assert [r["step"] for r in curves] == [1, 2] and "loss_g" in curves[0]
    metrics = json.loads((repo / "reports" / "eval" / "metrics.json").read_text())
    assert {"colorfulness", "delta_colorfulness", "psnr"} <= set(metrics)
    assert (repo / "reports" / "eval" / "samples.png").is_file()
    promotion = json.loads((repo / "reports" / "promotion.json").read_text())
    assert promotion["decision"] == "promoted" and promotion["promoted"] is True and promotion["version"] == "1"
    assert len(list((repo / "outputs" / "colorized").glob("*.jpg"))) == COUNT

    # the registry and the run: the model's training run got the val/* metrics, its version is the champion
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = json.loads((repo / "models" / "train" / "model.json").read_text())["extra"]["run_id"]
    assert promotion["run_id"] == run_id
    run = client.get_run(run_id)
    assert {"val/colorfulness", "val/psnr"} <= set(run.data.metrics) and "train/loss_g" in run.data.metrics
    assert str(client.get_model_version_by_alias("ddcolor", "champion").version) == "1"

    # models and big reports are git-ignored (DVC's .gitignore entries, checkpoints by the root .gitignore);
    # metrics.json, report.md, promotion.json and dvc.lock are meant to be committed
    status = sh.git(repo, "status", "--porcelain", "--untracked-files=all")
    untracked = {line[3:] for line in status.splitlines() if not line.endswith("/.gitignore")}
    assert not {p for p in untracked if p.startswith(("models/", "outputs/", "data/"))}, status
    assert {"dvc.lock", "reports/eval/metrics.json", "reports/eval/report.md", "reports/promotion.json"} <= untracked
    assert "reports/eval/samples.png" not in untracked

    # nothing changed: nothing runs, nothing is registered again
    out = sh.dvc(repo, "repro")
    assert UP_TO_DATE in out and not _ran(out), out
    assert [str(v.version) for v in client.search_model_versions("name='ddcolor'")] == ["1"]

    # a sweep point: `dvc exp run -S` retrains and re-evaluates, and stops before the registry when asked
    sh.git(repo, "add", "-A")
    sh.git(repo, "commit", "-q", "-m", "first model")
    out = sh.dvc(repo, "exp", "run", "-S", "train.lr=2e-4", "evaluate")
    assert _ran(out) == ["train", "evaluate"], out
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 2e-4
    assert [str(v.version) for v in client.search_model_versions("name='ddcolor'")] == ["1"]
    shown = sh.dvc(repo, "exp", "show", "--json")
    assert "2e-4" in shown.replace("0.0002", "2e-4")
