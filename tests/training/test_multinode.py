"""Multi-node torchrun: the rendezvous settings (`ddcolor.launch.Rendezvous`) and a real 2 nodes x 1 process run on
this machine (two torchrun agents meeting at a c10d store on 127.0.0.1, gloo) that ends with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddcolor import pipeline
from ddcolor.launch import Rendezvous
from tests.helpers.recipes import TINY_TRAIN, tiny_train_config
from tests.helpers.servers import free_port
from tests.helpers.training import DDP_WORKER


def test_one_node_is_standalone_and_n_nodes_meet_at_the_endpoint():
    assert Rendezvous().torchrun_args(4) == ["--standalone", "--nproc_per_node", "4"]
    args = Rendezvous(nnodes=3, node_rank=2, endpoint="trainer-0.trainer", run_id="run-7").torchrun_args(8)
    assert args == [
        *("--nnodes", "3", "--node_rank", "2", "--nproc_per_node", "8"),
        *("--rdzv_backend", "c10d", "--rdzv_endpoint", "trainer-0.trainer:29400", "--rdzv_id", "run-7"),
    ]
    cmd = pipeline.torchrun_command("c.yaml", "s3://b/shards", "out", 2, rendezvous=Rendezvous(2, 1, "10.0.0.5:1234"))
    assert cmd[cmd.index("--rdzv_endpoint") + 1] == "10.0.0.5:1234" and "--standalone" not in cmd
    assert cmd[cmd.index("-m") + 1 : cmd.index("-m") + 3] == ["ddcolor.cli", "train"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nnodes": 2}, "needs a rendezvous endpoint"),
        ({"nnodes": 2, "node_rank": 2, "endpoint": "h"}, "node_rank must be in 0..1"),
        ({"nnodes": 0}, "nnodes must be >= 1"),
        ({"nnodes": 2, "endpoint": "h", "backend": "etcd-v3"}, "use one of c10d, static"),
    ],
)
def test_bad_rendezvous_settings_say_what_to_give(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Rendezvous(**kwargs)


def _wait_for_port(endpoint: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import socket

    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"node 0 did not open the rendezvous store at {endpoint}")


@pytest.mark.slow
def test_two_nodes_one_process_each_end_with_identical_weights(tmp_path):
    """Two torchrun agents (as on two machines: --nnodes 2, each --nproc_per_node 1, its own --node_rank) meet at a
    c10d rendezvous on 127.0.0.1 and train the tiny random-init recipe with gloo for 2 steps; both ranks end with
    the same weights (all-reduced gradients), and world size 2."""
    import torch

    from ddcolor.data.ingest import ingest
    from ddcolor.data.samples import write_samples

    write_samples(str(tmp_path / "raw"), count=8)
    dataset = str(tmp_path / "shards")
    ingest(str(tmp_path / "raw"), dataset, tiny_train_config(), num_workers=0)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    overrides = json.dumps([*TINY_TRAIN, "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=100"])
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    nodes = []
    for node_rank in (0, 1):
        args = Rendezvous(2, node_rank, endpoint, run_id="test-2x1").torchrun_args(1)
        out = tmp_path / f"node{node_rank}"
        out.mkdir()  # rank 0 alone creates its --out; the other node's rank saves its weights here too
        cmd = [sys.executable, "-m", "torch.distributed.run", *args, str(script), dataset, str(out), overrides]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # noqa: SIM115 - closed below
        nodes.append((out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        if node_rank == 0:  # node 0 hosts the store: on a loaded machine its start can outlast node 1's 60 s wait
            _wait_for_port(endpoint, nodes[0][1])
    deadline = time.monotonic() + 600
    while any(proc.poll() is None for _, proc, _ in nodes) and time.monotonic() < deadline:
        if any(proc.returncode not in (None, 0) for _, proc, _ in nodes):
            break  # one node failed: the other would wait for it until the rendezvous timeout
        time.sleep(0.5)
    for _, proc, log in nodes:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    for node_rank, (_, proc, _) in enumerate(nodes):
        assert proc.returncode == 0, (tmp_path / f"node{node_rank}.log").read_text()[-4000:]

    # the rendezvous assigns global ranks; each node's folder holds its one rank's state
    states = [torch.load(next(out.glob("rank*.pt")), weights_only=False) for out, _, _ in nodes]
    assert sorted(int(next(out.glob("rank*.pt")).stem[4:]) for out, _, _ in nodes) == [0, 1]
    assert all(s["world_size"] == 2 and s["steps"] == 2 for s in states)
    a, b = states
    assert not set(a["seen"][0]["sha256"]) & set(b["seen"][0]["sha256"])  # disjoint data per rank
    for net in ("generator", "discriminator"):
        for key, value in a[net].items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # per-rank BatchNorm statistics (DDP broadcasts rank 0's at the next forward)
            assert torch.equal(value, b[net][key]), f"{net}.{key} differs between the nodes"


def test_k8s_multinode_job_wires_the_rendezvous():
    """infra/k8s/examples/train-multinode-job.yaml: an Indexed Job whose pods find node 0 through a headless Service,
    node rank = completion index, one process per GPU, the torchrun options `Rendezvous` builds."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "infra/k8s/examples/train-multinode-job.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    job, service = docs["Job"], docs["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    name = job["metadata"]["name"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": name}
    assert pod["subdomain"] == service["metadata"]["name"]
    (train,) = pod["containers"]
    args = [str(a) for a in train["args"]]
    nnodes, nproc = spec["completions"], train["resources"]["limits"]["nvidia.com/gpu"]
    program = args.index("-m")
    expected = Rendezvous(
        nnodes, 0, f"{name}-0.{service['metadata']['name']}:{service['spec']['ports'][0]['port']}", run_id=name
    ).torchrun_args(nproc)
    expected[expected.index("--node_rank") + 1] = "$(NODE_RANK)"
    assert args[:program] == expected
    (rank_env,) = [e for e in train["env"] if e["name"] == "NODE_RANK"]
    assert "job-completion-index" in rank_env["valueFrom"]["fieldRef"]["fieldPath"]
    assert args[program + 1 : program + 3] == ["ddcolor.cli", "train"] and "--resume" in args
