"""DistributedDataParallel on CPU: 2 processes (gloo) launched by torchrun, exactly as on a GPU cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddcolor.data.ingest import ingest
from ddcolor.data.samples import write_samples
from ddcolor.train import checkpoint as ckpt
from ddcolor.train.trainer import METRICS_FILE
from tests.helpers.recipes import TINY_TRAIN, tiny_train_config
from tests.helpers.training import DDP_WORKER


@pytest.mark.slow
def test_two_process_ddp_disjoint_data_identical_weights(tmp_path):
    write_samples(str(tmp_path / "raw"), count=12)
    dataset = str(tmp_path / "shards")
    ingest(str(tmp_path / "raw"), dataset, tiny_train_config(), num_workers=0)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "out"
    # effective batch 4 = 2 ranks x 2 accumulation steps x micro-batch 1: exercises no_sync() too
    overrides = [
        *TINY_TRAIN,
        "train.batch_size=4",
        "train.grad_accum_steps=2",
        "train.max_steps=4",
        "train.checkpoint_every=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
            *(str(script), dataset, str(out), json.dumps(overrides)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]

    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["micro_batch"] == 1
    assert r0["steps"] == r1["steps"] == 4
    # data: in every epoch the ranks read disjoint rows, together all but the (reported) dropped remainder
    assert [s["step"] for s in r0["seen"]] == [s["step"] for s in r1["seen"]] == [1, 2, 3, 4]
    epochs = {s["epoch"] for s in r0["seen"]}
    assert len(epochs) >= 2  # the run crossed an epoch boundary
    for epoch in epochs:
        a = [sha for s in r0["seen"] if s["epoch"] == epoch for sha in s["sha256"]]
        b = [sha for s in r1["seen"] if s["epoch"] == epoch for sha in s["sha256"]]
        assert len(a) == len(b) == r0["rows_per_rank"] == len(set(a))
        assert not set(a) & set(b), f"epoch {epoch}: both ranks read {set(a) & set(b)}"
        assert not (set(a) | set(b)) & set(r0["dropped"][epoch])
    # weights: all-reduced gradients keep the ranks identical. BatchNorm running statistics are the only per-rank
    # state (each rank's last forward updates them locally; DDP broadcasts rank 0's at the next forward)
    for net in ("generator", "discriminator"):
        for key, value in r0[net].items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue
            assert torch.equal(value, r1[net][key]), f"{net}.{key} differs between ranks"
    # rank 0 alone logged and checkpointed; the checkpoint holds both ranks' data positions and RNG states
    assert [json.loads(line)["step"] for line in (out / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4]
    loaded = ckpt.load_training_checkpoint(ckpt.find_latest(str(out / "checkpoints")))
    assert loaded.step == 4 and loaded.state["world_size"] == 2
    assert [r["loader"]["rank"] for r in loaded.state["ranks"]] == [0, 1]
    assert all(torch.equal(v, r0["generator"][k]) for k, v in loaded.generator.items())


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Only rank 1 gets SIGTERM: the stop flag's all-reduce at the step boundary makes rank 0 stop at the same step;
    rank 0 writes the checkpoint of that step and prints the line."""
    import signal
    import time

    write_samples(str(tmp_path / "raw"), count=12)
    dataset = str(tmp_path / "shards")
    ingest(str(tmp_path / "raw"), dataset, tiny_train_config(), num_workers=0)
    out = tmp_path / "out"
    overrides = [*TINY_TRAIN, "train.batch_size=2", "train.max_steps=200", "train.checkpoint_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
            *("-m", "ddcolor.cli", "train", "--data", dataset, "--out", str(out), "--no-track", "--no-progress"),
            *overrides,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / METRICS_FILE
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-5000:]
        assert time.monotonic() < deadline, "no step logged within 300 s"
        time.sleep(0.05)
    ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports the workers' 143
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    stopped = steps[-1]
    assert stopped < 200 and steps == list(range(1, stopped + 1))
    assert f"stopped at step {stopped}; resume with --resume" in err  # rank 0's line: it stopped there too
    loaded = ckpt.resume_checkpoint(str(out / "checkpoints"))
    assert loaded.step == stopped and loaded.state["world_size"] == 2
    assert [r["loader"]["rank"] for r in loaded.state["ranks"]] == [0, 1]
    assert "exitcode" in err and "143" in err
