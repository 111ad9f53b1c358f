"""The DDColor GAN trainer: `Trainer` (setup / train / save_checkpoint / cleanup) and the `train` entry point.

Recipe (official DDColor, ``options/train/train_ddcolor.yml``; every number comes from ``params.yaml``):

* G: AdamW(lr 1e-4, betas 0.9/0.99, weight decay 0.01); D: Adam(lr 1e-4, betas 0.9/0.99); MultiStepLR (gamma 0.5
  at 80k, 120k, ... 360k) on both, stepped once per optimizer step; 400k steps at an effective batch of 16.
* Every iteration: generator step, then discriminator step (BasicSR order). The D parameters are frozen during the
  generator step; the D step sees the generator output of the same iteration (detached).
* ``train.batch_size`` is the effective batch per optimizer step: micro-batch = batch_size / (world_size *
  grad_accum_steps). Gradients are accumulated over the micro-batches with DDP's ``no_sync()`` on all but the
  last, each micro-batch loss scaled by 1 / grad_accum_steps. (The pixel decoder has train-mode BatchNorm, so
  1 x 4 and 4 x 1 differ by the batch statistics; the loss arithmetic itself is the same.)
* Optional: gradient clipping (``grad_clip_norm``, G and D separately), EMA of G (``ema_decay``; the exported model
  is then the EMA), AMP (bf16 autocast on CUDA or CPU; fp16 with grad scaling on CUDA only), channels-last,
  ``torch.compile``.

Multi-GPU / multi-node: launch with ``torchrun`` (see `ddcolor.train.distributed`); each rank reads a disjoint part
of every epoch (`ddcolor.data.loader`). Only rank 0 logs, draws the progress bar and writes checkpoints.

Outputs (``out_dir``, a local folder): ``metrics.jsonl`` (one line per step: every loss term, lr, images/s),
``model.safetensors`` + ``model.json`` (the final generator, our format: ``ddcolor colorize --model``) and, unless
``train.checkpoint_dir`` is absolute or ``s3://``, the training checkpoints under ``out_dir/<checkpoint_dir>``
(`ddcolor.train.checkpoint`).

A non-finite loss stops the run before any weight is updated with `TrainingDivergedError` naming the step and the
loss terms; the newest checkpoint on disk is the last good one.

The perceptual loss's VGG16-BN follows ``model.pretrained``: ImageNet weights from the weights cache, or random
(``model.pretrained: null``; tests only, the perceptual term is then meaningless).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddcolor import storage
from ddcolor.config import Config
from ddcolor.errors import DDColorError
from ddcolor.tracking.context import git_sha
from ddcolor.train import checkpoint as ckpt
from ddcolor.train.distributed import DistInfo, all_gather_object, barrier, cleanup_distributed, setup_distributed

__all__ = ["METRICS_FILE", "MODEL_FILE", "TrainResult", "Trainer", "TrainingDivergedError", "TrainingStopped", "train"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
#: Metric name of each loss term returned by `ddcolor.losses.DDColorLoss` (unknown terms get ``loss_<name>``).
_TERM_NAMES = {"total": "loss_g", "d_total": "loss_d"}


class TrainingDivergedError(DDColorError, RuntimeError):
    """A loss became NaN or infinite; no weight was updated with it.

    Attributes:
        step: the optimizer step (1-based) whose loss was not finite.
        terms: every loss term of that step (averaged over micro-batches and ranks).
        checkpoint: the last good checkpoint folder (None if none was written yet).
    """

    def __init__(self, step: int, terms: dict[str, float], checkpoint: str | None) -> None:
        self.step, self.terms, self.checkpoint = step, dict(terms), checkpoint
        bad = [k for k, v in terms.items() if not math.isfinite(v)]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        where = (
            f"last good checkpoint: {checkpoint} (continue from it with --resume, e.g. after lowering train.lr or "
            "setting train.grad_clip_norm)"
            if checkpoint
            else "no checkpoint was written yet"
        )
        super().__init__(f"training diverged at step {step}: non-finite {', '.join(bad)} ({shown}); {where}")


class TrainingStopped(DDColorError, RuntimeError):
    """SIGTERM / SIGINT stopped the run at a step boundary, after a checkpoint of that step was written.

    Attributes:
        step: the last completed optimizer step (the checkpoint's step).
        signum: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
        checkpoint: the checkpoint folder of ``step`` (``--resume`` continues from it).
        exit_code: what a command-line program exits with: 128 + signum (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, step: int, signum: int, checkpoint: str | None) -> None:
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped at step {step}; resume with --resume on the same command (received {name}; checkpoint "
            f"{checkpoint})"
        )


@dataclass
class TrainResult:
    """What a finished `train` call produced.

    Attributes:
        checkpoint_path: the final generator, ``out_dir/model.safetensors`` (the EMA weights with
            ``train.ema_decay``); on ranks other than 0, the path rank 0 wrote.
        steps: optimizer steps completed.
        final_losses: the last step's loss terms (``loss_g``, ``loss_pixel``, ..., ``loss_d``), rank-averaged.
        run_id: the tracker's run id (None without tracking).
        model_uri: the MLflow model URI from ``tracker.log_model`` (None without tracking).
        checkpoint_dir: the last training checkpoint folder (for ``--resume``).
    """

    checkpoint_path: str
    steps: int
    final_losses: dict[str, float]
    run_id: str | None = None
    model_uri: str | None = None
    checkpoint_dir: str | None = None


def _metric_name(term: str) -> str:
    return _TERM_NAMES.get(term) or (term if term.startswith("loss") else f"loss_{term}")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # all devices


def _eta(step_seconds: list[float], remaining: int) -> str:
    """Time left for ``remaining`` steps at the mean step time so far (the first, warm-up step left out once
    there are others), e.g. ``"1 min 05 s"``."""
    times = step_seconds[1:] or step_seconds
    left = round(remaining * sum(times) / len(times)) if times else 0
    return f"{left // 60} min {left % 60:02d} s" if left >= 60 else f"{left} s"


def _flat_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _to_uint8_hwc(rgb: torch.Tensor) -> np.ndarray:
    """(3, H, W) float sRGB in [0, 1] -> (H, W, 3) uint8."""
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class Trainer:
    """DDColor GAN training on a Lab shard dataset (see the module docstring for the recipe and outputs).

    Use through `train`, or::

        trainer = Trainer(cfg, "data/shards", out_dir="runs/x")
        try:
            trainer.setup()
            result = trainer.train()
        finally:
            trainer.cleanup()

    Args:
        config: the whole configuration (``model``, ``data``, ``train`` sections are used).
        dataset_uri: shard dataset folder or ``s3://`` prefix (``manifest.json``).
        out_dir: local folder for metrics, the final model and (by default) checkpoints.
        init: generator initialisation instead of ``model``: an official release (``official:ddcolor_paper_tiny``
            or the bare name; from the weights cache), one of our ``.safetensors`` files or an official ``.pth``.
            The architecture then comes from the weights, not from ``model``. Ignored when resuming.
        resume: continue from the newest intact checkpoint under the checkpoint folder (every file verified
            against its recorded sha256; a damaged newest one is skipped with a loud warning; from scratch, with a
            warning, if there is none).
        resume_strict: with ``resume``, fail on a damaged newest checkpoint instead of falling back.
        tracker: where metrics / images / the model go (rank 0 only); None: nowhere. The caller owns it (finishes
            it).
        max_steps: stop after this many optimizer steps (default ``train.max_steps``); the LR milestones are not
            rescaled.
        num_workers: DataLoader workers per rank (default ``data.num_workers``).
        progress: draw a tqdm bar on rank 0.
        deterministic: ``torch.use_deterministic_algorithms(True)`` (and no cuDNN autotuning): bit-exact resumes
            on CUDA too, at some speed cost.
        image_every: log the probe grid every this many steps (default ``10 * train.log_every``; 0 = never).
        probe_images: val rows in the probe grid (the first ones, in manifest order).
        keep_last: training checkpoints to keep (None: ``train.keep_last``, whose null keeps all).
        handle_signals: on SIGTERM / SIGINT finish the current step, checkpoint and raise `TrainingStopped` (main
            thread only; a second signal exits at once).
    """

    def __init__(
        self,
        config: Config,
        dataset_uri: str,
        *,
        out_dir: str | os.PathLike[str],
        init: str | None = None,
        resume: bool = False,
        tracker: Any = None,
        max_steps: int | None = None,
        num_workers: int | None = None,
        progress: bool = True,
        deterministic: bool = False,
        image_every: int | None = None,
        probe_images: int = 4,
        keep_last: int | None = None,
        resume_strict: bool = False,
        handle_signals: bool = True,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.config = config
        self.dataset_uri = str(dataset_uri)
        self.out_dir = Path(out_dir)
        self.init = init
        self.resume = resume
        self.external_tracker = tracker
        self.max_steps = max_steps if max_steps is not None else config.train.max_steps
        self.num_workers = num_workers
        self.progress = progress
        self.deterministic = deterministic
        self.image_every = 10 * config.train.log_every if image_every is None else image_every
        self.probe_images = probe_images
        self.keep_last = config.train.keep_last if keep_last is None else keep_last
        self.resume_strict = resume_strict
        self.handle_signals = handle_signals
        self.stop_signal: int | None = None  # set by the SIGTERM / SIGINT handler; acted on at the step boundary
        td = config.train.checkpoint_dir
        self.checkpoint_root = td if storage.is_s3(td) or os.path.isabs(td) else str(self.out_dir / td)
        self.step = 0
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step = -1
        self.last_terms: dict[str, float] = {}
        self._step_seconds: list[float] = []  # this process's step times, for the ETA in the log lines
        self._is_setup = False
        self._was_deterministic = torch.are_deterministic_algorithms_enabled()

    # --- setup -------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the process group, build G / D / losses / optimizers / data, then resume or initialise."""
        from ddcolor.data.loader import build_dataloader
        from ddcolor.losses import DDColorLoss, Discriminator, LossWeights, PerceptualLoss
        from ddcolor.precision import resolve_amp
        from ddcolor.tracking import NullTracker

        cfg, tc = self.config, self.config.train
        self.dist: DistInfo = setup_distributed(tc.device)
        self.device = device = self.dist.device
        self._is_setup = True
        self.is_main = self.dist.is_main
        self.tracker = self.external_tracker if (self.is_main and self.external_tracker is not None) else NullTracker()
        world, accum = self.dist.world_size, tc.grad_accum_steps
        if tc.batch_size % (world * accum):
            raise ValueError(
                f"train.batch_size={tc.batch_size} must be divisible by world_size ({world}) x "
                f"train.grad_accum_steps ({accum}); e.g. set train.grad_accum_steps={max(1, tc.batch_size // world)}"
            )
        self.accum = accum
        self.micro_batch = tc.batch_size // (world * accum)

        # numerics
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: autotune convs once
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp = amp = resolve_amp(tc.amp, device)  # auto -> bf16 | none for this device, logged once
        if amp == "fp16" and device.type != "cuda":
            raise ValueError(f"train.amp=fp16 needs CUDA (device is {device}); use train.amp=bf16 or none")
        if amp == "bf16" and device.type not in ("cuda", "cpu"):
            raise ValueError(f"train.amp=bf16 is supported on CUDA and CPU, not {device.type}; use train.amp=none")
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

        # resume: find the checkpoint first, the architecture may come from it
        loaded = None
        if self.resume:
            loaded = ckpt.resume_checkpoint(self.checkpoint_root, strict=self.resume_strict)
            if loaded is None:
                log.warning("--resume: no checkpoint under %s; starting from scratch", self.checkpoint_root)
            else:
                self._check_resume(loaded)
                if self.init is not None:
                    log.warning("--resume: ignoring init=%s (the weights come from %s)", self.init, loaded.uri)

        # models (the same seed on every rank: identical initial weights, as DDP requires)
        _seed_all(tc.seed)
        perceptual_pretrained = cfg.model.pretrained
        if perceptual_pretrained is None and tc.loss_perceptual > 0:
            log.warning("perceptual loss uses a RANDOM VGG16-BN (model.pretrained=null): for tests only")
        self.criterion = DDColorLoss(LossWeights.from_config(tc), PerceptualLoss(pretrained=perceptual_pretrained))
        torch.manual_seed(tc.seed + 1)
        self.generator = self._build_generator(loaded)
        torch.manual_seed(tc.seed + 2)
        self.discriminator = Discriminator(nf=cfg.model.disc_nf)
        if loaded is not None:
            self.discriminator.load_state_dict(loaded.discriminator, strict=True)
        self.memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
        for module in (self.generator, self.discriminator, self.criterion):
            module.to(device)
            if tc.channels_last:
                module.to(memory_format=torch.channels_last)  # NHWC convs (tensor cores); inputs follow
        self.generator.train()
        self.discriminator.train()
        self.ema: nn.Module | None = None
        if tc.ema_decay is not None:
            self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
            if loaded is not None and loaded.ema is not None:
                self.ema.load_state_dict(loaded.ema, strict=True)

        # optimizers and schedules
        self.opt_g = torch.optim.AdamW(
            self.generator.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay
        )
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=tc.lr_d, betas=tc.betas_d, weight_decay=tc.weight_decay_d
        )
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, list(tc.milestones), gamma=tc.gamma)
        self.sched_d = torch.optim.lr_scheduler.MultiStepLR(self.opt_d, list(tc.milestones), gamma=tc.gamma)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        # data: each rank reads its own part of every epoch
        self.loader = build_dataloader(
            cfg.data,
            self.dataset_uri,
            "train",
            batch_size=self.micro_batch,
            rank=self.dist.rank,
            world_size=world,
            num_workers=self.num_workers,
            pin_memory=device.type == "cuda",
        )
        if len(self.loader.dataset) < self.micro_batch:
            raise ValueError(
                f"{self.dataset_uri}: {len(self.loader.dataset)} training rows per rank, fewer than one micro-batch "
                f"({self.micro_batch}); ingest more images or lower train.batch_size"
            )

        if loaded is not None:
            self._restore(loaded)
        else:
            _seed_all(tc.seed + self.dist.rank)  # per-rank streams from here on

        # wrappers: DDP (gradient all-reduce; rank 0's buffers broadcast at each forward), then compile
        self.g_ddp = self.d_ddp = None
        g_train: nn.Module = self.generator
        self.d_train: nn.Module = self.discriminator
        if self.dist.distributed:
            ids = [device.index] if device.type == "cuda" else None
            # find_unused_parameters=False: every G and D parameter gets a gradient each step (DDColor's encoder
            # has no unused head norm here, unlike upstream); DDP raises at step 2 if that ever changes.
            self.g_ddp = g_train = DDP(self.generator, device_ids=ids)
            self.d_ddp = self.d_train = DDP(self.discriminator, device_ids=ids)
        self.g_train = torch.compile(g_train) if tc.compile else g_train

        self.probe = self._probe_batch()
        self._open_metrics()
        if self.is_main:
            params = {**cfg.to_flat_dict()}
            params.update(
                {
                    "train.amp_resolved": amp,  # what train.amp (e.g. auto) became on this machine
                    "run.world_size": world,
                    "run.micro_batch_size": self.micro_batch,
                    "run.init": self.init or "",
                    "run.resumed_from_step": loaded.step if loaded is not None else "",
                    "run.generator_params": sum(p.numel() for p in self.generator.parameters()),
                    "run.dataset_rows_per_rank": len(self.loader.dataset),
                }
            )
            self.tracker.log_params(params)
            self.tracker.set_tags(self._dataset_tags())
            version = getattr(self, "dataset_version", {})
            if version.get("manifest_sha256") and hasattr(self.tracker, "log_dataset"):  # MLflow "Datasets used"
                self.tracker.log_dataset(version["uri"], version["manifest_sha256"], "training", rows=version["rows"])
        if self.is_main:
            log.info(
                "training %s on %s: %d steps, batch %d = %d ranks x %d accum x %d micro, from step %d",
                self.dataset_uri,
                device,
                self.max_steps,
                tc.batch_size,
                world,
                accum,
                self.micro_batch,
                self.step,
            )

    def _build_generator(self, loaded: ckpt.LoadedCheckpoint | None) -> nn.Module:
        from dataclasses import fields

        from ddcolor.model import DDColor, DDColorConfig, build_model_from_config
        from ddcolor.model.encoder import Encoder

        if loaded is not None:
            arch = loaded.meta.get("generator_config")
            if arch is None:
                model = build_model_from_config(self.config.model.model_copy(update={"pretrained": None}))
            else:
                known = {f.name for f in fields(DDColorConfig)}
                config = DDColorConfig(**{k: v for k, v in arch.items() if k in known})
                model = DDColor(config, Encoder(config.backbone, pretrained_file=None))
            model.load_state_dict(loaded.generator, strict=True)
            return model
        if self.init is None:
            return build_model_from_config(self.config.model)
        return _load_init(self.init, self.config)

    def _check_resume(self, loaded: ckpt.LoadedCheckpoint) -> None:
        world = loaded.state.get("world_size")
        if world != self.dist.world_size:
            raise ValueError(
                f"{loaded.uri} was written by {world} processes, this run has {self.dist.world_size}; resume with "
                "the same number of processes (the data position is per rank)"
            )
        old = loaded.meta.get("config_flat") or {}
        changed = _flat_diff(old, self.config.to_flat_dict())
        if changed:
            log.warning("resuming with a changed config (%s): %s", loaded.uri, "; ".join(changed))

    def _restore(self, loaded: ckpt.LoadedCheckpoint) -> None:
        state = loaded.state
        self.opt_g.load_state_dict(state["optimizer_g"])
        self.opt_d.load_state_dict(state["optimizer_d"])
        self.sched_g.load_state_dict(state["scheduler_g"])
        self.sched_d.load_state_dict(state["scheduler_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        mine = state["ranks"][self.dist.rank]
        self.loader.load_state_dict(mine["loader"])
        ckpt.restore_rng_state(mine["rng"])
        self.step = loaded.step
        self.last_checkpoint, self.last_checkpoint_step = loaded.uri, loaded.step
        self.last_terms = dict(loaded.meta.get("losses") or {})
        log.info("resumed from %s (step %d, epoch %d)", loaded.uri, loaded.step, mine["loader"]["epoch"])

    def _dataset_tags(self) -> dict[str, str]:
        from ddcolor.data.version import dataset_version

        try:
            version = dataset_version(self.dataset_uri)
            self.dataset_version = version.to_dict()
            return version.as_tags()
        except Exception as err:  # lineage is best effort; training does not depend on it
            log.warning("could not determine the dataset version of %s: %s", self.dataset_uri, err)
            self.dataset_version = {"uri": self.dataset_uri}
            return {"dataset.uri": self.dataset_uri}

    def _probe_batch(self) -> dict[str, torch.Tensor] | None:
        """The first ``probe_images`` val rows (fixed for the whole run), for the image grids; rank 0 only."""
        if not self.is_main or self.probe_images < 1 or self.image_every < 1:
            return None
        from ddcolor.data.loader import build_dataloader

        val = build_dataloader(
            self.config.data, self.dataset_uri, "val", batch_size=self.probe_images, rank=0, world_size=1, num_workers=0
        )
        batch = next(iter(val), None)
        if batch is None:
            log.info("no val rows in %s: no probe image grids", self.dataset_uri)
            return None
        return {k: batch[k].clone() for k in ("gray_rgb", "l", "ab")}

    def _open_metrics(self) -> None:
        """``out_dir/metrics.jsonl``; on resume, lines past the checkpoint's step are dropped (they are redone)."""
        self.metrics_path = self.out_dir / METRICS_FILE
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.step == 0:
            self.metrics_path.write_text("")
        elif self.metrics_path.exists():
            kept = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step
            ]
            self.metrics_path.write_text("".join(f"{line}\n" for line in kept))

    # --- train -------------------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Micro-batches forever, epoch after epoch (the loader's state_dict tracks the position)."""
        while True:
            yield from self.loader
            self.loader.set_epoch(self.loader.dataset.epoch + 1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nb = self.device.type == "cuda"
        gray = batch["gray_rgb"].to(self.device, non_blocking=nb).contiguous(memory_format=self.memory_format)
        return gray, batch["l"].to(self.device, non_blocking=nb), batch["ab"].to(self.device, non_blocking=nb)

    def forward_backward(self, micro_batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Accumulate G and D gradients over ``micro_batches`` (one optimizer step's worth); no weight changes.

        Returns:
            Every loss term (detached, averaged over the micro-batches, this rank only): the generator's
            (``pixel``, ``perceptual``, ``gan``, ``colorfulness``, ``total``) and the discriminator's
            (``d_real``, ``d_fake``, ``d_total``).
        """
        n = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        outputs = []

        # generator step: D frozen (its gradients would be discarded anyway), BasicSR order
        self.discriminator.requires_grad_(False)
        for i, batch in enumerate(micro_batches):
            gray, l, ab = self._to_device(batch)  # noqa: E741
            sync = i == n - 1  # all-reduce gradients only on the last micro-batch
            with self.g_ddp.no_sync() if (self.g_ddp is not None and not sync) else contextlib.nullcontext():
                with self._autocast():
                    pred_ab = self.g_train(gray)  # (B, 2, H, W) ab
                    # the raw D (not its DDP wrapper): frozen here, so DDP must not expect its gradients
                    loss_g, terms = self.criterion.generator_loss(pred_ab, l, ab, self.discriminator)
                self.scaler_g.scale(loss_g / n).backward()
            outputs.append((pred_ab.detach(), l, ab))
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()

        # discriminator step on this iteration's (detached) generator outputs
        self.discriminator.requires_grad_(True)
        for i, (pred_ab, l, ab) in enumerate(outputs):  # noqa: E741
            sync = i == n - 1
            with self.d_ddp.no_sync() if (self.d_ddp is not None and not sync) else contextlib.nullcontext():
                with self._autocast():
                    loss_d, terms = self.criterion.discriminator_loss(pred_ab, l, ab, self.d_train)
                self.scaler_d.scale(loss_d / n).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.float()
        return {k: v / n for k, v in sums.items()}

    def _reduce_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Average the terms over the ranks; ONE device sync per step (also what the NaN check needs)."""
        keys = list(terms)
        values = torch.stack([terms[k] for k in keys])
        if self.dist.distributed:
            torch.distributed.all_reduce(values)
            values /= self.dist.world_size
        return {_metric_name(k): v for k, v in zip(keys, values.tolist(), strict=True)}

    def _optimizer_step(self, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, module: nn.Module) -> None:
        clip = self.config.train.grad_clip_norm
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.train.ema_decay
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.generator.parameters()], 1.0 - decay)
        for e, b in zip(self.ema.buffers(), self.generator.buffers(), strict=True):
            e.copy_(b)

    def train(self) -> TrainResult:
        """Run until ``max_steps`` optimizer steps; checkpoint every ``train.checkpoint_every`` and at the end.

        Raises:
            TrainingDivergedError: a NaN / inf loss (nothing is saved for that step).
            TrainingStopped: SIGTERM / SIGINT (see `Trainer`): the current step was finished and checkpointed.
        """
        with self._stop_on_signals():
            return self._train()

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While training: SIGTERM / SIGINT ask for a stop at the next step boundary; a second one exits at once.

        Only the main thread can install signal handlers; elsewhere (a Prefect task in a worker thread) the
        process keeps its own handling.
        """
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                # checkpoint files are written atomically: exiting mid-write leaves the previous one intact
                os.write(2, f"\nsecond signal ({name}): exiting at once, at step {self.step}\n".encode())
                os._exit(128 + signum)
            self.stop_signal = signum
            log.warning(
                "%s: finishing step %d, then writing a checkpoint and stopping (send it again to exit at once)",
                name,
                self.step + 1,
            )

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _agreed_stop(self) -> int:
        """The stop signal if any rank received one (0 otherwise): every rank stops at the same step."""
        local = self.stop_signal or 0
        if not self.dist.distributed:
            return local
        flag = torch.tensor([local], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stop(self, signum: int) -> None:
        """Checkpoint the finished step (the normal, verified path) and raise `TrainingStopped`."""
        if self.last_checkpoint_step != self.step:
            self.save_checkpoint()
        stopped = TrainingStopped(self.step, signum, self.last_checkpoint)
        if self.is_main:
            log.warning("%s", stopped)
        raise stopped

    def _train(self) -> TrainResult:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        if not self._is_setup:
            self.setup()
        tc = self.config.train
        batches = self._batches()
        bar = tqdm(
            total=self.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and self.is_main),
        )
        with bar, logging_redirect_tqdm():
            while self.step < self.max_steps:
                started = time.perf_counter()
                step = self.step + 1
                micro_batches = [next(batches) for _ in range(self.accum)]

                terms = self._reduce_terms(self.forward_backward(micro_batches))
                if not all(math.isfinite(v) for v in terms.values()):
                    self.opt_g.zero_grad(set_to_none=True)
                    self.opt_d.zero_grad(set_to_none=True)
                    raise TrainingDivergedError(step, terms, self.last_checkpoint)

                lrs = {"lr": self.opt_g.param_groups[0]["lr"], "lr_d": self.opt_d.param_groups[0]["lr"]}
                self._optimizer_step(self.opt_g, self.scaler_g, self.generator)
                self._optimizer_step(self.opt_d, self.scaler_d, self.discriminator)
                self.sched_g.step()  # per optimizer step: milestone m first affects step m + 1, as BasicSR
                self.sched_d.step()
                if self.ema is not None:
                    self._update_ema()
                self.step = step
                self.last_terms = terms

                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # honest step time (the loss .tolist() already synced the stream)
                seconds = time.perf_counter() - started
                images_per_s = tc.batch_size / seconds
                self._log_step(terms, lrs, images_per_s, bar)
                if self.image_every and step % self.image_every == 0:
                    self._log_probe()
                if step % tc.checkpoint_every == 0 or step == self.max_steps:
                    self.save_checkpoint()
                signum = self._agreed_stop()
                if signum and self.step < self.max_steps:
                    self._stop(signum)
        if self.last_checkpoint_step != self.step:
            self.save_checkpoint()
        return self._finish()

    def _log_step(self, terms: dict[str, float], lrs: dict[str, float], images_per_s: float, bar: Any) -> None:
        if not self.is_main:
            return
        step = self.step
        record = {"step": step, "epoch": self.loader.dataset.epoch, **terms, **lrs, "images_per_s": images_per_s}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics.update({f"train/{k}": v for k, v in lrs.items()})
        metrics["train/images_per_s"] = images_per_s
        self.tracker.log_metrics(metrics, step=step)
        bar.update(1)
        bar.set_postfix(loss_g=f"{terms.get('loss_g', float('nan')):.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
        self._step_seconds.append(self.config.train.batch_size / images_per_s)
        if step % self.config.train.log_every == 0 or step == 1:
            shown = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            log.info(
                "step %d/%d | %s | lr %.3g lr_d %.3g | %.1f img/s | ETA %s",
                step,
                self.max_steps,
                shown,
                *lrs.values(),
                images_per_s,
                _eta(self._step_seconds, self.max_steps - step),
            )

    @torch.no_grad()
    def _log_probe(self) -> None:
        """Log gray | prediction | ground truth rows of the fixed probe set (the EMA model if there is one)."""
        if self.probe is None:
            return
        from ddcolor.color import lab_to_rgb

        model = self.ema if self.ema is not None else self.generator
        was_training = model.training
        model.eval()
        try:
            gray, l, ab = self._to_device(self.probe)  # noqa: E741
            with self._autocast():
                pred_ab = model(gray)
            pred = lab_to_rgb(torch.cat([l, pred_ab.float().clamp(-128, 127)], dim=1))
            truth = lab_to_rgb(torch.cat([l, ab], dim=1))
        finally:
            model.train(was_training)
        rows = [torch.cat([g, p, t], dim=2) for g, p, t in zip(gray.float(), pred, truth, strict=True)]  # (3,H,3W)
        self.tracker.log_image(_to_uint8_hwc(torch.cat(rows, dim=1)), key="train/probe", step=self.step)

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> str | None:
        """Write a training checkpoint of the current step (rank 0 writes; every rank contributes its RNG and
        data position). Returns the step folder on rank 0, None elsewhere."""
        ranks = all_gather_object({"rng": ckpt.capture_rng_state(), "loader": self.loader.state_dict()})
        folder = None
        if self.is_main:
            state = {
                "optimizer_g": self.opt_g.state_dict(),
                "optimizer_d": self.opt_d.state_dict(),
                "scheduler_g": self.sched_g.state_dict(),
                "scheduler_d": self.sched_d.state_dict(),
                "scaler_g": self.scaler_g.state_dict(),
                "scaler_d": self.scaler_d.state_dict(),
                "world_size": self.dist.world_size,
                "ranks": ranks,
            }
            meta = {
                "config": self.config.model_dump(mode="json"),
                "config_flat": self.config.to_flat_dict(),
                "generator_config": asdict(self.generator.config),
                "losses": self.last_terms,
                "epoch": self.loader.dataset.epoch,
                "dataset": getattr(self, "dataset_version", {"uri": self.dataset_uri}),
                "init": self.init,
                "git_sha": git_sha(),
                "run_id": self.tracker.run_id,
                "world_size": self.dist.world_size,
                "micro_batch_size": self.micro_batch,
            }
            folder = ckpt.save_training_checkpoint(
                self.checkpoint_root,
                self.step,
                generator=self.generator,
                discriminator=self.discriminator,
                ema=self.ema,
                trainer_state=state,
                meta=meta,
                keep_last=self.keep_last,
            )
        barrier()  # nobody runs ahead (or exits) before the checkpoint is complete
        self.last_checkpoint = folder or storage.join(self.checkpoint_root, ckpt.step_dir_name(self.step))
        self.last_checkpoint_step = self.step
        return folder

    def _finish(self) -> TrainResult:
        """Export the final generator (EMA if any) to ``out_dir/model.safetensors`` and log it (rank 0)."""
        from ddcolor.model.checkpoint import save_checkpoint

        path = self.out_dir / MODEL_FILE
        model_uri = None
        if self.is_main:
            model = self.ema if self.ema is not None else self.generator
            extra = {
                "step": self.step,
                "run_id": self.tracker.run_id,
                "dataset": getattr(self, "dataset_version", {"uri": self.dataset_uri}),
                "ema": self.ema is not None,
                "init": self.init,
            }
            path = save_checkpoint(model, path, extra=json.loads(json.dumps(extra, default=str)))
            model_uri = self.tracker.log_model(path, name="generator")
            log.info("final model: %s%s", path, f" ({model_uri})" if model_uri else "")
        barrier()
        return TrainResult(
            checkpoint_path=str(path),
            steps=self.step,
            final_losses=dict(self.last_terms),
            run_id=self.tracker.run_id,
            model_uri=model_uri,
            checkpoint_dir=self.last_checkpoint,
        )

    def cleanup(self) -> None:
        """Leave the process group (safe to call after a failed setup)."""
        if self._is_setup:
            cleanup_distributed()
            torch.use_deterministic_algorithms(self._was_deterministic)  # a process-wide switch: put it back
            self._is_setup = False


def _load_init(spec: str, config: Config) -> nn.Module:
    """The generator named by ``init`` (see `Trainer`), in train mode, through `ddcolor.model.load.load_generator`.

    ``spec`` is an official release name, a generator file, or an MLflow ``models:/...`` URI.

    Raises:
        FileNotFoundError: a ``models:/`` URI that does not resolve (no such model, version or alias).
        ddcolor.weights.WeightsNotFoundError: an official release that is not in the cache (names the command).
        FileNotFoundError, ddcolor.model.CheckpointError: a missing or unreadable file.
    """
    from ddcolor.model.load import load_generator

    model = load_generator(spec).train()
    arch = asdict(model.config)
    wanted = {"num_queries": config.model.num_queries, "dec_layers": config.model.dec_layers, "nf": config.model.nf}
    differs = {k: (v, arch[k]) for k, v in wanted.items() if arch.get(k) != v}
    if differs or (config.model.backbone or "") not in ("", arch["backbone"]):
        log.info("init %s: architecture from the weights (%s), not the model section of the config", spec, arch)
    return model


def train(
    config: Config,
    dataset_uri: str,
    *,
    out_dir: str | os.PathLike[str],
    init: str | None = None,
    resume: bool = False,
    tracker: Any = None,
    max_steps: int | None = None,
    **options: Any,
) -> TrainResult:
    """Train DDColor on a shard dataset (the entry point of ``ddcolor train`` and the flows).

    Args:
        config: the whole configuration.
        dataset_uri: shard dataset folder or ``s3://`` prefix.
        out_dir: local output folder (metrics.jsonl, model.safetensors, checkpoints by default).
        init: generator initialisation (official release, our .safetensors, an official .pth); see `Trainer`.
        resume: continue from the newest checkpoint.
        tracker: a `ddcolor.tracking.Tracker` (rank 0 logs to it; the caller finishes it); None: no tracking.
        max_steps: override ``train.max_steps``.
        **options: further `Trainer` keywords (num_workers, progress, deterministic, image_every, probe_images,
            keep_last, resume_strict, handle_signals).

    Returns:
        The `TrainResult`.

    Raises:
        TrainingDivergedError: a NaN / inf loss.
        TrainingStopped: SIGTERM / SIGINT; the last step was checkpointed (``--resume`` continues bit-exactly).
        ddcolor.train.checkpoint.CheckpointCorruptError, NoIntactCheckpointError: ``resume`` found only damaged
            checkpoints (or a damaged newest one with ``resume_strict``).
        ddcolor.train.checkpoint.CheckpointWriteError: a checkpoint could not be written (the previous one is kept).
        ValueError: a configuration that cannot train (batch layout, device, AMP mode, too few rows, ...).
    """
    trainer = Trainer(
        config,
        dataset_uri,
        out_dir=out_dir,
        init=init,
        resume=resume,
        tracker=tracker,
        max_steps=max_steps,
        **options,
    )
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
