"""The CUDA paths of the tests (``pytest -m cuda``): colorize, training steps (eager and compiled), DDP with one
process (nccl, torchrun), ONNX export of a CUDA model. Each test skips without a CUDA device, so on a CPU machine
``pytest -m cuda`` only checks that they collect. ``bench/gpu_check.py`` runs them when a GPU is lent.

The same small networks as the CPU tests (random initialisation; timm's ``test_convnext`` backbone with a small
decoder), so each test takes seconds on a GPU; the CPU result is the reference where one is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddcolor.config import load_config
from ddcolor.data.ingest import ingest
from ddcolor.data.samples import write_samples
from ddcolor.model import build_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py runs these)"),
]

SMALL = {"num_queries": 4, "dec_layers": 1, "nf": 32, "hidden_dim": 32, "dim_feedforward": 64, "nheads": 2}
TRAIN = [
    "model.backbone=test_convnext",
    "model.pretrained=null",
    *[f"model.{k}={v}" for k, v in SMALL.items()],
    "model.disc_nf=8",
    "data.size=64",
    "data.num_workers=0",
    "data.val_fraction=0",
    "data.min_colorfulness=0",
    "train.device=cuda",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.seed=0",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cuda_data")
    write_samples(str(root / "raw"), count=8)
    ingest(str(root / "raw"), str(root / "shards"), load_config(None, TRAIN), num_workers=0)
    return str(root / "shards")


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_colorize_on_cuda_matches_cpu(precision):
    from ddcolor.colorize import Colorizer

    torch.manual_seed(0)
    model = build_model("test_convnext", pretrained=None, **SMALL).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(72, 90), dtype=np.uint8) for _ in range(3)]
    cpu = Colorizer(model, input_size=64, device="cpu", precision="fp32").colorize_batch(images)
    gpu = Colorizer(model, input_size=64, device="cuda", precision=precision).colorize_batch(images)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.abs(a.astype(int) - b.astype(int)).max() <= (2 if precision == "fp32" else 8)


@pytest.mark.parametrize("options", [["train.amp=none"], ["train.amp=bf16", "train.channels_last=true"]])
def test_training_steps_on_cuda(dataset, tmp_path, options):
    from ddcolor.train import train

    result = train(load_config(None, [*TRAIN, *options]), dataset, out_dir=tmp_path, progress=False, image_every=0)
    assert result.steps == 3
    losses = _losses(tmp_path)
    assert len(losses) == 3 and all(np.isfinite(r["loss_g"]) and np.isfinite(r["loss_d"]) for r in losses)


def test_compiled_training_on_cuda_matches_eager(dataset, tmp_path):
    from ddcolor.train import train

    options = ["train.amp=bf16", "train.channels_last=true"]
    train(load_config(None, [*TRAIN, *options]), dataset, out_dir=tmp_path / "e", progress=False, image_every=0)
    compiled = [*TRAIN, *options, "train.compile=true"]
    train(load_config(None, compiled), dataset, out_dir=tmp_path / "c", progress=False, image_every=0)
    for e, c in zip(_losses(tmp_path / "e"), _losses(tmp_path / "c"), strict=True):
        assert c["loss_pixel"] == pytest.approx(e["loss_pixel"], rel=2e-2, abs=1e-3)
        assert c["loss_g"] == pytest.approx(e["loss_g"], rel=2e-2, abs=1e-3)


def test_ddp_one_process_nccl(dataset, tmp_path):
    """torchrun with one process on one GPU: the DDP + nccl path of a multi-GPU run."""
    overrides = json.dumps([*TRAIN, "train.max_steps=2"])
    code = (
        "import json, sys\n"
        "from ddcolor.config import load_config\n"
        "from ddcolor.train import train\n"
        "result = train(load_config(None, json.loads(sys.argv[3])), sys.argv[1], out_dir=sys.argv[2], progress=False,"
        " image_every=0)\n"
        "assert result.steps == 2\n"
    )
    script = tmp_path / "run.py"
    script.write_text(code)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(script), dataset,
         str(tmp_path / "out"), overrides],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_losses(tmp_path / "out")) == 2


def test_onnx_export_of_a_cuda_model(tmp_path):
    from ddcolor.export import OnnxColorModel, export_onnx

    torch.manual_seed(0)
    model = build_model("test_convnext", pretrained=None, **SMALL).eval().cuda()
    path = export_onnx(model, tmp_path / "m.onnx")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x.cuda()).float().cpu().numpy()
    got = OnnxColorModel(path, providers=["CPUExecutionProvider"])(x).numpy()
    assert np.abs(got - expected).max() < 1e-2
