"""`train.compile=true`: a few `torch.compile`d training steps (inductor, CPU) agree with eager ones.

Until the anti-checkerboard blur was restated (`ddcolor.model.layers.blur_2x2`), the compiled training step failed
in the backward pass: inductor's fallback for ``aten.replication_pad2d_backward`` asserted contiguous strides on a
channels-last gradient. Here the generator is compiled by the trainer exactly as ``train.compile=true`` does, in
fp32 (the same numerics on every CPU; the bf16/channels-last case of the original failure is the blur test below), on
the smallest network the trainer accepts: timm's ``test_convnext`` backbone (0.6 M parameters in all) with a small
decoder, 64 px, batch 2, so that compilation (most of the time: about a minute of CPU) stays small. Random
initialisation throughout.

Tolerances: compiled kernels reorder float sums, which changes the last bits of the losses. A wrong backward (the
failure mode of a bad restatement) changes the step-2 and step-3 losses at the percent level and flips Adam's update
directions, so the weights after 3 steps are also compared against how far training moved them: measured 2e-5 of
that distance in fp32 (bound 1e-3). Under bf16 autocast the same comparison measured 0.063: Adam's early, sign-like
updates amplify bf16's rounding differences, so a weight bound there says little.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddcolor.config import load_config
from ddcolor.data.ingest import ingest
from ddcolor.data.samples import write_samples
from ddcolor.model.layers import PixelShuffleICNR, blur_2x2
from ddcolor.train import Trainer

SMALL = [
    "model.backbone=test_convnext",
    "model.pretrained=null",
    "model.num_queries=4",
    "model.dec_layers=1",
    "model.nf=32",
    "model.hidden_dim=32",
    "model.dim_feedforward=64",
    "model.nheads=2",
    "model.disc_nf=8",
    "data.size=64",
    "data.num_workers=0",
    "data.val_fraction=0",
    "data.min_colorfulness=0",
    "train.device=cpu",
    "train.batch_size=2",
    "train.max_steps=3",
    "train.log_every=1",
    "train.checkpoint_every=1000",
    "train.amp=none",  # fp32: the same numerics on every CPU (emulated bf16 is ~80x slower without AMX)
    "train.channels_last=false",
    "train.seed=0",
]


def test_blur_restatement_equals_replication_pad_and_avg_pool():
    """Forward bit-identical to the upstream module pair; gradients equal up to summation order."""
    torch.manual_seed(0)
    upstream = torch.nn.Sequential(torch.nn.ReplicationPad2d((1, 0, 1, 0)), torch.nn.AvgPool2d(2, stride=1))
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 5, 7, 9).to(memory_format=memory_format)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        weights = torch.randn(2, 5, 7, 9)
        out_a, out_b = upstream(a), blur_2x2(b)
        assert out_b.shape == x.shape and torch.equal(out_a, out_b)
        (out_a * weights).sum().backward()
        (out_b * weights).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_compiled_upsample_blur_backward_on_channels_last_bf16():
    """The exact failure: conv -> ReLU -> PixelShuffle -> blur, compiled, bf16 autocast, channels-last, backward.

    With ``ReplicationPad2d`` this raised inductor's stride assertion in ``replication_pad2d_backward``.
    """
    torch.manual_seed(0)
    layer = PixelShuffleICNR(8, 4, scale=2, blur=True, use_bn=False).to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 8, 12, 12).to(memory_format=torch.channels_last)
    weights = torch.randn(2, 4, 24, 24)
    grads = []
    for fn in (layer, torch.compile(layer)):
        xx = x.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(xx)
        (out.float() * weights).sum().backward()
        grads.append((out.detach().float(), xx.grad.clone(), layer.conv[0].weight_orig.grad.clone()))
    for eager, compiled in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def _run(dataset: str, out: Path, compiled: bool) -> tuple[list[dict], dict, dict, bool]:
    """Train 3 steps; (per-step losses, initial and final generator weights, whether the generator is compiled)."""
    config = load_config(None, [*SMALL, f"train.compile={str(compiled).lower()}"])
    trainer = Trainer(config, dataset, out_dir=out, progress=False, image_every=0, keep_last=1)
    try:
        trainer.setup()
        initial = {k: v.detach().float().clone() for k, v in trainer.generator.state_dict().items()}
        result = trainer.train()
        final = {k: v.detach().float().clone() for k, v in trainer.generator.state_dict().items()}
        is_compiled = isinstance(trainer.g_train, torch._dynamo.eval_frame.OptimizedModule)
    finally:
        trainer.cleanup()
    assert result.steps == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, initial, final, is_compiled


@pytest.mark.slow
def test_compiled_training_steps_match_eager(tmp_path):
    write_samples(str(tmp_path / "raw"), count=4)
    ingest(str(tmp_path / "raw"), str(tmp_path / "shards"), load_config(None, SMALL), num_workers=0)
    dataset = str(tmp_path / "shards")
    torch._dynamo.reset()
    eager, w0, w_eager, eager_compiled = _run(dataset, tmp_path / "eager", compiled=False)
    compiled, w0_c, w_compiled, is_compiled = _run(dataset, tmp_path / "compiled", compiled=True)
    assert not eager_compiled and is_compiled

    assert len(eager) == len(compiled) == 3
    for step, (e, c) in enumerate(zip(eager, compiled, strict=True), start=1):
        for term in ("loss_pixel", "loss_perceptual", "loss_gan", "loss_colorfulness", "loss_g", "loss_d"):
            assert c[term] == pytest.approx(e[term], rel=1e-3, abs=1e-5), f"step {step} {term}: {c[term]} vs {e[term]}"

    moved = changed = 0.0
    for name, start in w0.items():
        assert torch.equal(start, w0_c[name]), f"{name}: the two runs did not start from the same weights"
        if start.is_floating_point() and "running_" not in name and "weight_u" not in name and "weight_v" not in name:
            moved += float((w_eager[name] - start).abs().sum())
            changed += float((w_compiled[name] - w_eager[name]).abs().sum())
    assert moved > 0
    assert changed < 1e-3 * moved, f"compiled weights differ by {changed / moved:.3f} of the distance training moved"
