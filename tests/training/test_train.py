"""The trainer on CPU: a tiny atto model (8 queries, 3 decoder layers) on 12 built-in sample images at 64 px.

Everything runs from random weights (``model.pretrained=null``: random encoder and random perceptual VGG), so no
weights cache or network is needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ddcolor.cli import app
from ddcolor.data.ingest import ingest
from ddcolor.data.samples import write_samples
from ddcolor.model.checkpoint import load_model, save_checkpoint
from ddcolor.model.convert import CheckpointError
from ddcolor.train import Trainer, TrainingDivergedError, train
from ddcolor.train import checkpoint as ckpt
from ddcolor.train.trainer import METRICS_FILE, MODEL_FILE
from tests.helpers.recipes import TINY_TRAIN, tiny_train_config


class RecordingTracker:
    """A `ddcolor.tracking.Tracker` that keeps everything in memory."""

    run_id = "test-run"

    def __init__(self) -> None:
        self.params: dict = {}
        self.tags: dict = {}
        self.metrics: list[tuple[int, dict]] = []
        self.images: list[tuple[str, int, np.ndarray]] = []
        self.models: list[tuple[Path, str]] = []
        self.finished: str | None = None

    def log_params(self, params):
        self.params.update(params)

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image, key, step):
        self.images.append((key, step, image))

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_model(self, model_dir_or_checkpoint, name="generator"):
        self.models.append((Path(model_dir_or_checkpoint), name))
        return "models:/m-test"

    def finish(self, status="FINISHED"):
        self.finished = status


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """12 sample images ingested at 64 px: about 9 train and 3 val rows."""
    root = tmp_path_factory.mktemp("train_data")
    write_samples(str(root / "raw"), count=12)
    ingest(str(root / "raw"), str(root / "shards"), tiny_train_config(), num_workers=0)
    return str(root / "shards")


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    """One 4-step run with EMA, a checkpoint every 2 steps (keeping 1), probe grids every 2 steps."""
    out = tmp_path_factory.mktemp("run")
    tracker = RecordingTracker()
    cfg = tiny_train_config("train.max_steps=4", "train.checkpoint_every=2", "train.ema_decay=0.9")
    result = train(cfg, dataset, out_dir=out, tracker=tracker, progress=False, image_every=2, keep_last=1)
    return result, tracker, out


# --- a short run -------------------------------------------------------------------------------------------------


def test_run_logs_finite_losses_images_and_model(run, dataset):
    result, tracker, out = run
    assert result.steps == 4
    assert result.run_id == "test-run" and result.model_uri == "models:/m-test"
    assert set(result.final_losses) >= {"loss_g", "loss_pixel", "loss_perceptual", "loss_gan", "loss_d"}
    assert all(np.isfinite(v) for v in result.final_losses.values())
    assert [s for s, _ in tracker.metrics] == [1, 2, 3, 4]
    for _, metrics in tracker.metrics:
        assert {"train/loss_g", "train/loss_colorfulness", "train/loss_d_real", "train/lr", "train/lr_d"} <= set(
            metrics
        )
        assert metrics["train/images_per_s"] > 0
        assert all(np.isfinite(v) for v in metrics.values())
    # probe grid: 3 val rows, each gray | prediction | ground truth
    assert [(k, s) for k, s, _ in tracker.images] == [("train/probe", 2), ("train/probe", 4)]
    grid = tracker.images[0][2]
    assert grid.dtype == np.uint8 and grid.shape == (3 * 64, 3 * 64, 3)
    assert tracker.tags["dataset.uri"] == dataset and len(tracker.tags["dataset.manifest_sha256"]) == 64
    assert tracker.params["run.world_size"] == 1 and tracker.params["train.lr"] == 1e-4
    from ddcolor.precision import resolve_amp  # what train.amp (auto unless the recipe says) became here

    assert tracker.params["train.amp_resolved"] == resolve_amp(tracker.params["train.amp"], "cpu")
    # the final model is the EMA, loadable as any of our checkpoints, and was logged
    assert result.checkpoint_path == str(out / MODEL_FILE)
    assert tracker.models == [(out / MODEL_FILE, "generator")]
    model = load_model(result.checkpoint_path)
    assert model.config.num_queries == 8
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]


def test_checkpoint_is_complete_and_pointer_last(run):
    result, _, out = run
    root = out / "checkpoints"
    assert json.loads((root / ckpt.LATEST_NAME).read_text())["step"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step_00000004"]  # keep_last=1 pruned step 2
    assert ckpt.find_latest(str(root)) == result.checkpoint_dir == str(root / "step_00000004")
    loaded = ckpt.load_training_checkpoint(result.checkpoint_dir)
    assert loaded.step == 4
    state = loaded.state
    for key in ("optimizer_g", "optimizer_d", "scheduler_g", "scheduler_d", "scaler_g", "scaler_d"):
        assert key in state, key
    assert state["scheduler_g"]["last_epoch"] == 4 and len(state["optimizer_g"]["state"]) > 0
    (rank0,) = state["ranks"]
    assert set(rank0["rng"]) >= {"python", "numpy", "torch"}
    assert rank0["loader"]["position"] > 0 and rank0["loader"]["epoch"] >= 0
    assert loaded.ema is not None and set(loaded.ema) == set(loaded.generator)
    assert set(loaded.meta) >= {"config", "generator_config", "losses", "dataset", "git_sha", "files"}
    # integrity: meta.json records every other file, the pointer every file (meta.json too), as sha256 + size
    folder = Path(result.checkpoint_dir)
    pointer = json.loads((root / ckpt.LATEST_NAME).read_text())
    names = {ckpt.GENERATOR_FILE, ckpt.EMA_FILE, ckpt.DISCRIMINATOR_FILE, ckpt.STATE_FILE}
    assert set(loaded.meta["files"]) == names and set(pointer["files"]) == names | {ckpt.META_FILE}
    for name, record in pointer["files"].items():
        data = (folder / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
        assert name == ckpt.META_FILE or loaded.meta["files"][name] == record
    assert loaded.meta["dataset"]["manifest_sha256"]
    # the checkpoint's generator is a regular model file
    model = load_model(Path(result.checkpoint_dir) / ckpt.GENERATOR_FILE)
    assert all(torch.equal(v, loaded.generator[k]) for k, v in model.state_dict().items())


# --- schedule, accumulation --------------------------------------------------------------------------------------


def test_lr_decays_at_milestones(dataset, tmp_path):
    tracker = RecordingTracker()
    cfg = tiny_train_config("train.max_steps=5", "train.milestones=[2, 4]", "train.gamma=0.5", "train.lr_d=2e-4")
    train(cfg, dataset, out_dir=tmp_path, tracker=tracker, progress=False, image_every=0)
    lrs = [m["train/lr"] for _, m in tracker.metrics]
    assert lrs == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])  # milestone m first affects step m + 1
    assert [m["train/lr_d"] for _, m in tracker.metrics] == pytest.approx([2e-4, 2e-4, 1e-4, 1e-4, 5e-5])


def test_grad_accumulation_matches_one_big_batch(dataset, tmp_path):
    """1 x 4 and 4 x 1 give the same G and D gradients (with BN and spectral norm frozen).

    In train mode the two are not equal by design: the pixel decoder's BatchNorm normalises with the batch's
    statistics and each spectral-norm forward advances its power iteration. Eval mode freezes both, isolating the
    accumulation arithmetic (1 / grad_accum_steps scaling, summing, no_sync) that this test is about.
    """
    grads = []
    for accum in (1, 4):
        # fp32: the accumulation arithmetic, not bf16 rounding (train.amp=auto is bf16 on AMX CPUs)
        cfg = tiny_train_config("train.batch_size=4", f"train.grad_accum_steps={accum}", "train.amp=none")
        trainer = Trainer(cfg, dataset, out_dir=tmp_path / str(accum), progress=False, image_every=0)
        trainer.setup()
        try:
            if accum == 1:
                batch = next(iter(trainer.loader))
                keys = ("gray_rgb", "l", "ab")
                micro = [batch]
            else:
                micro = [{k: batch[k][i : i + 1] for k in keys} for i in range(4)]
            trainer.generator.eval()
            trainer.discriminator.eval()
            terms = trainer.forward_backward(micro)
            assert all(torch.isfinite(v) for v in terms.values())
            grads.append(
                {
                    f"{name}.{k}": p.grad.clone()
                    for name, module in (("g", trainer.generator), ("d", trainer.discriminator))
                    for k, p in module.named_parameters()
                }
            )
        finally:
            trainer.cleanup()
    big, small = grads
    assert big.keys() == small.keys()
    assert all(g is not None for g in big.values())  # every parameter gets a gradient (no unused ones for DDP)
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-3, atol=1e-6, msg=k)


# --- failures ----------------------------------------------------------------------------------------------------


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    from ddcolor.losses import DDColorLoss

    original = DDColorLoss.generator_loss
    calls = {"n": 0}

    def poisoned(self, pred_ab, l, ab, discriminator):  # noqa: E741
        calls["n"] += 1
        total, terms = original(self, pred_ab, l, ab, discriminator)
        if calls["n"] == 3:  # step 3 (one micro-batch per step)
            total = total * float("nan")
            terms = {**terms, "pixel": terms["pixel"] * float("nan"), "total": total.detach()}
        return total, terms

    monkeypatch.setattr(DDColorLoss, "generator_loss", poisoned)
    cfg = tiny_train_config("train.max_steps=5", "train.checkpoint_every=2")
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg, dataset, out_dir=tmp_path, progress=False, image_every=0)
    err = info.value
    assert err.step == 3 and not np.isfinite(err.terms["loss_pixel"]) and np.isfinite(err.terms["loss_d"])
    assert "step 3" in str(err) and "loss_pixel" in str(err) and "step_00000002" in str(err)
    root = tmp_path / "checkpoints"
    assert json.loads((root / ckpt.LATEST_NAME).read_text())["step"] == 2
    assert not (root / "step_00000003").exists() and not (tmp_path / MODEL_FILE).exists()
    loaded = ckpt.load_training_checkpoint(str(root / "step_00000002"))
    assert all(torch.isfinite(v).all() for v in loaded.generator.values())


def test_batch_layout_error_names_the_fix(dataset, tmp_path):
    cfg = tiny_train_config("train.batch_size=6", "train.grad_accum_steps=3")  # valid config: 6 / 3 = micro 2
    trainer = Trainer(cfg, dataset, out_dir=tmp_path)
    trainer.setup()
    trainer.cleanup()
    assert trainer.micro_batch == 2
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        train(tiny_train_config("train.batch_size=64"), dataset, out_dir=tmp_path, progress=False)


# --- init --------------------------------------------------------------------------------------------------------


def test_init_from_our_safetensors(dataset, tmp_path):
    from ddcolor.model import build_model

    torch.manual_seed(123)
    source = build_model("atto", pretrained=None, num_queries=4, dec_layers=2, nf=32, hidden_dim=32, nheads=2)
    path = save_checkpoint(source, tmp_path / "start.safetensors")
    trainer = Trainer(tiny_train_config(), dataset, out_dir=tmp_path / "out", init=str(path))
    trainer.setup()
    try:
        assert trainer.generator.config.num_queries == 4  # the architecture comes from the weights
        state = trainer.generator.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())
    finally:
        trainer.cleanup()


def test_init_from_official_pth(dataset, tmp_path):
    from tests.helpers.official import load_manifest, random_state_dict

    state = random_state_dict(load_manifest()["tiny"], seed=1)
    torch.save({"params": state}, tmp_path / "official.pth")
    trainer = Trainer(tiny_train_config(), dataset, out_dir=tmp_path / "out", init=str(tmp_path / "official.pth"))
    trainer.setup()
    try:
        assert trainer.generator.config.backbone == "convnext_tiny" and trainer.generator.config.num_queries == 100
        assert trainer.generator.training
    finally:
        trainer.cleanup()


def test_init_missing_official_release_names_the_fetch_command(dataset, tmp_path, monkeypatch):
    from ddcolor.weights import ENV_VAR, WeightsNotFoundError

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "empty_cache"))
    with pytest.raises(WeightsNotFoundError, match="ddcolor weights fetch ddcolor_paper_tiny"):
        train(tiny_train_config(), dataset, out_dir=tmp_path, init="official:ddcolor_paper_tiny", progress=False)


def test_init_from_unknown_mlflow_model_names_the_uri(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(FileNotFoundError, match=r"cannot load 'models:/ddcolor@champion'"):
        train(tiny_train_config(), dataset, out_dir=tmp_path, init="models:/ddcolor@champion", progress=False)


# --- resume ------------------------------------------------------------------------------------------------------

_RUNNER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    from ddcolor.config import load_config
    from ddcolor.train import Trainer, train

    dataset, out, mode, overrides = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if mode == "victim":  # after the step-3 checkpoint, dawdle in step 4 so the kill lands mid-step
        forward_backward = Trainer.forward_backward

        def slow(self, micro):
            if self.step >= 3:
                time.sleep(30)
            return forward_backward(self, micro)

        Trainer.forward_backward = slow
    cfg = load_config(None, overrides)
    train(cfg, dataset, out_dir=out, resume=mode == "resume", progress=False, deterministic=True, image_every=2)
    """
)


def _run_script(script: Path, dataset: str, out: Path, mode: str, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), dataset, str(out), mode, json.dumps(overrides)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(dataset, tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    overrides = [*TINY_TRAIN, "train.max_steps=6", "train.checkpoint_every=3", "train.ema_decay=0.5"]

    reference = _run_script(script, dataset, tmp_path / "ref", "fresh", overrides)
    victim = _run_script(script, dataset, tmp_path / "resumed", "victim", overrides)
    pointer = tmp_path / "resumed" / "checkpoints" / ckpt.LATEST_NAME
    deadline = time.monotonic() + 120
    while not pointer.exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    assert json.loads(pointer.read_text())["step"] == 3
    time.sleep(0.5)  # now inside step 4
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL

    resumed = _run_script(script, dataset, tmp_path / "resumed", "resume", overrides)
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]

    ref, res = _losses(tmp_path / "ref"), _losses(tmp_path / "resumed")
    assert [r["step"] for r in res] == [1, 2, 3, 4, 5, 6]
    drop = {"images_per_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in res] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]
    for name in (MODEL_FILE, f"checkpoints/step_00000006/{ckpt.GENERATOR_FILE}"):
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = ckpt.load_training_checkpoint(str(tmp_path / "ref" / "checkpoints" / "step_00000006"))
    b = ckpt.load_training_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "step_00000006"))
    assert all(torch.equal(a.discriminator[k], b.discriminator[k]) for k in a.discriminator)
    for opt in ("optimizer_g", "optimizer_d"):
        for i, s in a.state[opt]["state"].items():
            assert all(torch.equal(s[k], b.state[opt]["state"][i][k]) for k in s), (opt, i)


def test_resume_without_checkpoint_starts_fresh_and_continues(dataset, tmp_path):
    cfg = tiny_train_config("train.max_steps=2", "train.checkpoint_every=1")
    first = train(cfg, dataset, out_dir=tmp_path, resume=True, progress=False, image_every=0)
    assert first.steps == 2
    tracker = RecordingTracker()
    more = train(cfg, dataset, out_dir=tmp_path, resume=True, max_steps=3, tracker=tracker, progress=False)
    assert more.steps == 3 and [s for s, _ in tracker.metrics] == [3]
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3]
    assert tracker.params["run.resumed_from_step"] == 2


# --- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_train_no_track(dataset, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--data",
            dataset,
            "--out",
            str(tmp_path),
            "--no-track",
            "--no-progress",
            *TINY_TRAIN,
            "train.max_steps=2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"model: {tmp_path / MODEL_FILE}" in result.output
    assert (tmp_path / MODEL_FILE).is_file() and (tmp_path / "checkpoints" / ckpt.LATEST_NAME).is_file()


def test_cli_train_bad_override_exits_2(dataset, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", dataset, "--out", str(tmp_path), "--no-track", "train.lrr=1"])
    assert result.exit_code == 2 and "train.lrr" in result.output


@pytest.mark.slow
def test_cli_finetune_end_to_end(tmp_path):
    from ddcolor.model import build_model

    write_samples(str(tmp_path / "photos"), count=12)
    start = save_checkpoint(
        build_model("atto", pretrained=None, num_queries=8, dec_layers=3, nf=64, hidden_dim=64, nheads=4),
        tmp_path / "start.safetensors",
    )
    out = tmp_path / "ft"
    overrides = [o for o in TINY_TRAIN if not o.startswith("train.batch_size")] + ["train.max_steps=2"]
    result = CliRunner().invoke(
        app,
        [
            *("finetune", str(tmp_path / "photos"), "--init", str(start), "--out", str(out)),
            *("--no-track", "--no-progress", *overrides),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "data" / "manifest.json").is_file()
    assert f"model: {out / MODEL_FILE}" in result.output and "ddcolor colorize --model" in result.output
    model = load_model(out / MODEL_FILE)
    assert model.config.num_queries == 8


def test_checkpoints_on_s3_prune_and_resume(dataset, tmp_path, s3_env):
    root = f"s3://{s3_env}/runs/x/ckpt"
    cfg = tiny_train_config("train.max_steps=2", "train.checkpoint_every=1", f"train.checkpoint_dir={root}")
    train(cfg, dataset, out_dir=tmp_path, progress=False, image_every=0, keep_last=1)
    from ddcolor import storage

    names = [u.removeprefix(root + "/") for u in storage.list_files(root)]
    assert {n.split("/")[0] for n in names} == {ckpt.LATEST_NAME, "step_00000002"}  # step 1 pruned
    assert ckpt.find_latest(root) == f"{root}/step_00000002"
    more = train(cfg, dataset, out_dir=tmp_path, resume=True, max_steps=3, progress=False, image_every=0)
    assert more.steps == 3 and ckpt.find_latest(root) == f"{root}/step_00000003"


# --- checkpoint integrity, fallback, no pickle, failed writes (#18) ---------------------------------------------


@pytest.fixture(scope="module")
def three_checkpoints(dataset, tmp_path_factory) -> Path:
    """A 3-step run with a checkpoint at every step (train.keep_last's default of 3 keeps all three)."""
    out = tmp_path_factory.mktemp("three")
    train(tiny_train_config("train.max_steps=3", "train.checkpoint_every=1"), dataset, out_dir=out, progress=False)
    return out


def _copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_loudly(three_checkpoints, tmp_path, caplog):
    run = _copy_run(three_checkpoints, tmp_path)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000003"]
    _truncate(root / "step_00000003" / ckpt.GENERATOR_FILE)
    with caplog.at_level("WARNING"):
        loaded = ckpt.resume_checkpoint(str(root))
    assert loaded.step == 2 and [e.step for e in loaded.skipped] == [3]
    assert loaded.skipped[0].file == ckpt.GENERATOR_FILE and "truncated" in loaded.skipped[0].reason
    text = caplog.text
    assert "DAMAGED CHECKPOINT" in text and "step_00000003/generator.safetensors" in text
    assert "FELL BACK to checkpoint step 2" in text
    # strict: fails, naming the step, the file and the alternative
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"checkpoint step 3: .*generator\.safetensors: size") as info:
        ckpt.resume_checkpoint(str(root), strict=True)
    assert "plain --resume" in str(info.value)
    # a bit flip (same size) in step 2's state: caught by the sha256, falls back to step 1
    _flip_byte(root / "step_00000002" / ckpt.STATE_FILE)
    loaded = ckpt.resume_checkpoint(str(root))
    assert loaded.step == 1 and [(e.step, e.file) for e in loaded.skipped] == [
        (3, ckpt.GENERATOR_FILE),
        (2, ckpt.STATE_FILE),
    ]
    # none intact: one clear error
    (root / "step_00000001" / ckpt.DISCRIMINATOR_FILE).unlink()
    with pytest.raises(ckpt.NoIntactCheckpointError, match=r"no intact checkpoint under .*3 damaged"):
        ckpt.resume_checkpoint(str(root))
    # an unreadable pointer is damage too; the step folders are still tried
    (root / ckpt.LATEST_NAME).write_text("{not json")
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"latest\.json: unreadable"):
        ckpt.resume_checkpoint(str(root), strict=True)


def test_cli_resume_falls_back_and_strict_fails_in_one_line(three_checkpoints, dataset, tmp_path):
    run = _copy_run(three_checkpoints, tmp_path)
    root = run / "checkpoints"
    _truncate(root / "step_00000003" / ckpt.GENERATOR_FILE)
    base = [
        "train",
        "--data",
        dataset,
        "--out",
        str(run),
        "--no-track",
        "--no-progress",
        *TINY_TRAIN,
        "train.max_steps=3",
    ]
    strict = CliRunner().invoke(app, [*base, "--resume-strict"])
    assert strict.exit_code == 1 and "Traceback" not in strict.output
    assert "checkpoint step 3:" in strict.output and "step_00000003/generator.safetensors" in strict.output
    resumed = CliRunner().invoke(app, [*base, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in _losses(run)] == [1, 2, 3]  # step 3 trained again from step 2
    assert ckpt.resume_checkpoint(str(root)).step == 3 and not ckpt.resume_checkpoint(str(root)).skipped
    # nothing intact: one line, exit 1
    for folder in root.glob("step_*"):
        _truncate(folder / ckpt.STATE_FILE)
    nothing = CliRunner().invoke(app, [*base, "--resume"])
    assert nothing.exit_code == 1 and "Traceback" not in nothing.output
    assert "no intact checkpoint under" in nothing.output


def test_colorize_refuses_a_damaged_training_generator(three_checkpoints, tmp_path):
    run = _copy_run(three_checkpoints, tmp_path)
    generator = run / "checkpoints" / "step_00000003" / ckpt.GENERATOR_FILE
    load_model(generator)  # intact: loads (and is verified)
    _flip_byte(generator)
    with pytest.raises(CheckpointError, match=r"damaged training checkpoint file \(step 3\): sha256 differs"):
        load_model(generator)
    write_samples(str(tmp_path / "photos"), count=1)
    photos = [str(p) for p in sorted((tmp_path / "photos").iterdir())]
    result = CliRunner().invoke(
        app, ["colorize", *photos, "--model", str(generator), "-o", str(tmp_path / "out"), "--input-size", "64"]
    )
    assert result.exit_code == 1 and "damaged training checkpoint file" in result.output
    assert "Traceback" not in result.output


_MALICIOUS = textwrap.dedent(
    """
    import os, pickle, sys

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sys.argv[2]}",))

    with open(sys.argv[1], "wb") as fh:
        pickle.dump({"format": "ddcolor-train-state", "payload": Payload()}, fh)
    """
)


def test_malicious_trainer_state_is_refused_and_not_run(three_checkpoints, tmp_path):
    run = _copy_run(three_checkpoints, tmp_path)
    root = run / "checkpoints"
    folder = root / "step_00000003"
    marker = tmp_path / "pwned"
    script = tmp_path / "evil.py"
    script.write_text(_MALICIOUS)
    subprocess.run([sys.executable, str(script), str(folder / ckpt.STATE_FILE), str(marker)], check=True)
    # an attacker who can write the bucket can also fix up the recorded hashes: the refusal must not rely on them
    data = (folder / ckpt.STATE_FILE).read_bytes()
    meta = json.loads((folder / ckpt.META_FILE).read_text())
    meta["files"][ckpt.STATE_FILE] = ckpt.file_record(data)
    (folder / ckpt.META_FILE).write_text(json.dumps(meta))
    pointer = json.loads((root / ckpt.LATEST_NAME).read_text())
    pointer["files"][ckpt.STATE_FILE] = ckpt.file_record(data)
    pointer["files"][ckpt.META_FILE] = ckpt.file_record((folder / ckpt.META_FILE).read_bytes())
    (root / ckpt.LATEST_NAME).write_text(json.dumps(pointer))

    with pytest.raises(ckpt.CheckpointCorruptError, match=r"trainer_state\.pt: refused or unreadable, nothing in it"):
        ckpt.resume_checkpoint(str(root), strict=True)
    assert not marker.exists()
    assert ckpt.resume_checkpoint(str(root)).step == 2  # plain --resume skips it like any damaged checkpoint
    assert not marker.exists()


def test_disk_full_midway_keeps_previous_checkpoint_and_resume_works(dataset, tmp_path, monkeypatch):
    from ddcolor import storage

    real = storage.write_bytes

    def write_bytes(uri, data):
        if str(uri).endswith(f"step_00000003/{ckpt.STATE_FILE}"):
            # the real atomic writer, whose write fails half way with ENOSPC
            def half_then_full(fh):
                fh.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            return storage._atomic_local(Path(uri), half_then_full, str(uri))
        return real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    cfg = tiny_train_config("train.max_steps=3", "train.checkpoint_every=2")
    with pytest.raises(ckpt.CheckpointWriteError, match="No space left on device") as info:
        train(cfg, dataset, out_dir=tmp_path, progress=False, image_every=0)
    assert "step 3" in str(info.value) and "still points at the intact step 2" in str(info.value)
    root = tmp_path / "checkpoints"
    assert json.loads((root / ckpt.LATEST_NAME).read_text())["step"] == 2
    assert sorted(p.name for p in root.iterdir()) == [ckpt.LATEST_NAME, "step_00000002"]  # no partial step 3
    assert not list(root.rglob("*.tmp"))
    monkeypatch.setattr(storage, "write_bytes", real)
    more = train(cfg, dataset, out_dir=tmp_path, resume=True, progress=False, image_every=0)
    assert more.steps == 3 and ckpt.resume_checkpoint(str(root)).step == 3
    assert [r["step"] for r in _losses(tmp_path)] == [1, 2, 3]


# --- graceful stop (#20) -------------------------------------------------------------------------------------------


def _cli_train(out: Path, dataset: str, overrides: list[str], *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ddcolor.cli", "train", "--data", dataset, "--out", str(out), "--no-track"]
    return subprocess.Popen(
        [*cmd, "--no-progress", *extra, *overrides], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _wait_for_step(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    """Until the run has logged a step (metrics.jsonl has a line): the signal then lands inside the loop."""
    deadline = time.monotonic() + timeout
    while not ((out / METRICS_FILE).is_file() and (out / METRICS_FILE).read_text().strip()):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no step logged within {timeout} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_stops_at_a_step_checkpoints_and_resume_is_bit_exact(dataset, tmp_path):
    overrides = [*TINY_TRAIN, "train.max_steps=8", "train.checkpoint_every=100", "train.ema_decay=0.5"]
    reference = _cli_train(tmp_path / "ref", dataset, overrides)
    victim = _cli_train(tmp_path / "run", dataset, overrides)
    _wait_for_step(victim, tmp_path / "run")
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=300)
    err = err.decode()
    assert victim.returncode == 143, err[-3000:]
    stopped = int(json.loads((tmp_path / "run" / "checkpoints" / ckpt.LATEST_NAME).read_text())["step"])
    assert 1 <= stopped < 8
    assert f"stopped at step {stopped}; resume with --resume" in err and "Traceback" not in err
    assert [r["step"] for r in _losses(tmp_path / "run")] == list(range(1, stopped + 1))
    assert ckpt.resume_checkpoint(str(tmp_path / "run" / "checkpoints")).step == stopped  # verified checkpoint
    assert not (tmp_path / "run" / MODEL_FILE).exists()  # stopping is not finishing

    resumed = _cli_train(tmp_path / "run", dataset, overrides, "--resume")
    for proc in (reference, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    drop = {"images_per_s"}
    ref, res = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [{k: v for k, v in r.items() if k not in drop} for r in res] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref
    ]
    a, b = load_file(tmp_path / "ref" / MODEL_FILE), load_file(tmp_path / "run" / MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = ckpt.load_training_checkpoint(str(tmp_path / "ref" / "checkpoints" / "step_00000008"))
    b = ckpt.load_training_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000008"))
    assert all(torch.equal(a.discriminator[k], b.discriminator[k]) for k in a.discriminator)


@pytest.mark.slow
def test_sigint_stops_with_130_and_a_second_signal_exits_at_once(dataset, tmp_path):
    overrides = [*TINY_TRAIN, "train.max_steps=50", "train.checkpoint_every=100"]
    proc = _cli_train(tmp_path / "a", dataset, overrides)
    _wait_for_step(proc, tmp_path / "a")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert "stopped at step" in err.decode()
    # two signals: the second one does not wait for the step (the victim dawdles 30 s in step 4) or a checkpoint
    script = tmp_path / "runner.py"
    script.write_text(_RUNNER)
    proc = _run_script(script, dataset, tmp_path / "b", "victim", overrides)
    deadline = time.monotonic() + 180
    while len(_losses(tmp_path / "b") if (tmp_path / "b" / METRICS_FILE).is_file() else []) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "step 3 not logged within 180 s"
        time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)  # two signals before the handler ran would count as one
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "second signal (SIGTERM): exiting at once" in err.decode(), err.decode()[-3000:]
    assert time.monotonic() - started < 20  # not after the 30 s step
    assert not (tmp_path / "b" / "checkpoints" / ckpt.LATEST_NAME).exists()


def test_cli_failures_are_one_or_two_lines_with_exit_1(dataset, tmp_path, monkeypatch):
    """A diverged run, a missing weight file (train --init, colorize --model): no traceback, the file named."""
    from ddcolor.losses import DDColorLoss

    base = ["train", "--data", dataset, "--out", str(tmp_path / "run"), "--no-track", "--no-progress", *TINY_TRAIN]
    missing = CliRunner().invoke(app, [*base, "--init", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert "nope.safetensors" in missing.output and len(missing.output.strip().splitlines()) <= 2

    write_samples(str(tmp_path / "photos"), count=1)
    photo = str(next((tmp_path / "photos").iterdir()))
    result = CliRunner().invoke(app, ["colorize", photo, "--model", str(tmp_path / "gone.safetensors"), "-o", "x"])
    assert result.exit_code == 1 and "Traceback" not in result.output and "gone.safetensors" in result.output

    original = DDColorLoss.generator_loss

    def poisoned(self, pred_ab, l, ab, discriminator):  # noqa: E741
        total, terms = original(self, pred_ab, l, ab, discriminator)
        return total * float("nan"), {**terms, "total": (total * float("nan")).detach()}

    monkeypatch.setattr(DDColorLoss, "generator_loss", poisoned)
    diverged = CliRunner().invoke(app, [*base, "train.max_steps=2"])
    assert diverged.exit_code == 1 and "Traceback" not in diverged.output
    assert "training diverged at step 1" in diverged.output and "no checkpoint was written yet" in diverged.output
