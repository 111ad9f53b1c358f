"""`ddcolor demo`: colorize a few real photos shipped with scikit-image and show the result in one grid image.

Steps: the sample photos (astronaut, coffee, chelsea, rocket, Hubble deep field; those that load offline) are
turned into grayscale PNGs (their CIELAB L) in ``OUT/gray/``, colorized by the same file pipeline as
`ddcolor colorize` into ``OUT/color/``, and ``OUT/grid.png`` shows one row per photo: gray input | colorized |
original.

Model: ``--model`` when given; else the official ``ddcolor_paper_tiny`` release if it is in the weights cache; else
an explicit random-init atto model, with a loud warning that its colors are meaningless.

That is the colorize-only demo (``ddcolor demo --colorize-only``). ``ddcolor demo`` runs the whole ``train-ddcolor``
pipeline first, then colorizes the same photos with the champion it promoted (`run_demo` with a loaded model). Its
recipe is self-contained: `pipeline_demo_params` holds all of it (preset, batch, image sizes, input size, steps,
precision) on top of the package's built-in defaults, and never reads a ``params.yaml`` from the working directory,
so ``ddcolor demo`` in an empty folder does what ``make demo`` does. Before training it says how long the run will
take here, from one timed training step of that recipe (`time_training_step`); the trainer's log lines carry an ETA.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddcolor.color import gray_rgb_from_l, rgb_to_lab
from ddcolor.colorize import RANDOM_INIT_WARNING, Colorizer, ColorizeReport, colorize_files, load_colorization_model
from ddcolor.colorize import random_init_model as _random_init_model
from ddcolor.imageio import to_uint
from ddcolor.model import DDColor
from ddcolor.recipes import recipe_sections

__all__ = [
    "DEFAULT_RELEASE",
    "PIPELINE_DEMO_STEPS",
    "SAMPLES",
    "DemoResult",
    "choose_model",
    "estimate_demo_seconds",
    "estimate_message",
    "format_duration",
    "make_grid",
    "pipeline_demo_config",
    "pipeline_demo_params",
    "pipeline_demo_sections",
    "run_demo",
    "sample_images",
    "time_training_step",
]

log = logging.getLogger(__name__)

SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
DEFAULT_RELEASE = "ddcolor_paper_tiny"
GRID_COLUMNS = ("gray input", "colorized", "original")
TILE = 256  # px, side of one grid cell
HEADER = 24  # px, height of the column-title row


@dataclass
class DemoResult:
    """What `run_demo` wrote.

    Attributes:
        grid: the grid PNG (rows = photos, columns = gray input | colorized | original).
        gray_dir: the grayscale inputs.
        color_dir: the colorized outputs.
        model: what colorized them (release name, checkpoint path, or "random-init atto").
        random_init: True when the colors are meaningless (random-init model).
        report: the `ColorizeReport` of the colorization step.
    """

    grid: Path
    gray_dir: Path
    color_dir: Path
    model: str
    random_init: bool
    report: ColorizeReport


def sample_images(names: Sequence[str] = SAMPLES) -> dict[str, np.ndarray]:
    """The scikit-image sample photos among ``names`` that load offline, as uint8 (H, W, 3) RGB.

    Samples that scikit-image would have to download (or that this version lacks) are left out with a warning.
    """
    import skimage.data

    images = {}
    for name in names:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception as err:  # missing in this version, or needs a download (pooch) without network
            log.warning("sample %r not available offline (%s: %s); leaving it out", name, type(err).__name__, err)
            continue
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        images[name] = np.ascontiguousarray(image[:, :, :3].astype(np.uint8))
    return images


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) sRGB -> uint8 (H, W) gray of the same CIELAB lightness (what the network sees)."""
    tensor = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    gray = gray_rgb_from_l(rgb_to_lab(tensor)[:, :1])[0].mean(dim=0)  # the 3 channels are equal up to 1e-4
    return to_uint(gray.numpy(), 8)


def choose_model(
    model: str | os.PathLike[str] | DDColor | None = None, random_init: bool = False
) -> tuple[DDColor, str, bool]:
    """Pick the demo model.

    Args:
        model: a loaded `DDColor`, or a release name, checkpoint path or ``models:/`` URI (see
            `ddcolor.colorize.load_colorization_model`); wins if given.
        random_init: use a random-init atto model even if weights are cached.

    Returns:
        ``(model, description, is_random_init)``.

    Raises:
        whatever `load_colorization_model` raises for an explicit ``model``.
    """
    from ddcolor import weights

    if isinstance(model, DDColor):
        return model, "given model", False
    if model is not None:
        return load_colorization_model(model), str(model), False
    if not random_init:
        try:
            weights.resolve(DEFAULT_RELEASE, verify=False)
        except weights.WeightsNotFoundError:
            log.warning("%s is not in the weights cache (%s)", DEFAULT_RELEASE, weights.cache_dir())
        else:
            return load_colorization_model(DEFAULT_RELEASE), DEFAULT_RELEASE, False
    log.warning(RANDOM_INIT_WARNING.format(preset="atto"))
    return _random_init_model("atto", warn=False), "random-init atto", True


def _fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled to fit a ``side`` x ``side`` tile (aspect kept), centered on a dark background."""
    scale = side / max(image.size)
    resized = image.convert("RGB").resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    tile = Image.new("RGB", (side, side), (32, 32, 32))
    tile.paste(resized, ((side - resized.width) // 2, (side - resized.height) // 2))
    return tile


def make_grid(
    rows: Sequence[Sequence[Image.Image]], columns: Sequence[str] = GRID_COLUMNS, tile: int = TILE
) -> Image.Image:
    """A grid image: a title row, then one row of ``tile``-sized cells per entry of ``rows``."""
    grid = Image.new("RGB", (tile * len(columns), HEADER + tile * len(rows)), (16, 16, 16))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, title in enumerate(columns):
        draw.text((c * tile + 6, 5), title, fill=(235, 235, 235), font=font)
    for r, cells in enumerate(rows):
        for c, cell in enumerate(cells):
            grid.paste(_fit(cell, tile), (c * tile, HEADER + r * tile))
    return grid


def run_demo(
    out: str | os.PathLike[str] = "demo_out",
    model: str | os.PathLike[str] | DDColor | None = None,
    input_size: int = 256,
    device: str = "auto",
    precision: str = "auto",
    random_init: bool = False,
    samples: Sequence[str] = SAMPLES,
    label: str | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and return where everything went.

    Args:
        out: output folder (``gray/``, ``color/`` and ``grid.png`` are written inside; existing files replaced).
        model: a loaded `DDColor`, a release name, checkpoint or ``models:/`` URI; None = ``ddcolor_paper_tiny`` if
            cached, else random-init atto.
        input_size: network resolution, px (multiple of 32); 256 keeps the CPU run short.
        device: "auto", "cpu", "cuda" or "mps".
        precision: "auto" (bf16 where the device has native bf16, else fp32), "fp32", "bf16" or "fp16".
        random_init: force the random-init atto model.
        samples: scikit-image sample names.
        label: what to call the model in the result and the log (default: derived from ``model``).

    Raises:
        RuntimeError: no sample image could be loaded, or a sample failed to colorize.
    """
    out = Path(out)
    gray_dir, color_dir = out / "gray", out / "color"
    originals = sample_images(samples)
    if not originals:
        raise RuntimeError(f"none of the scikit-image samples {list(samples)} could be loaded offline")
    gray_dir.mkdir(parents=True, exist_ok=True)
    gray_files = []
    for name, rgb in originals.items():
        path = gray_dir / f"{name}.png"
        Image.fromarray(to_gray(rgb)).save(path)
        gray_files.append(path)

    network, description, is_random = choose_model(model, random_init)
    description = label or description
    colorizer = Colorizer(network, input_size=input_size, device=device, precision=precision)
    report = colorize_files(colorizer, gray_files, color_dir, overwrite=True)
    if report.failed:
        raise RuntimeError("demo colorization failed:\n" + report.summary())

    rows = []
    for (name, rgb), gray_path in zip(originals.items(), gray_files, strict=True):
        with Image.open(gray_path) as gray, Image.open(color_dir / f"{name}.png") as color:
            rows.append([gray.copy(), color.copy(), Image.fromarray(rgb)])
    grid_path = out / "grid.png"
    make_grid(rows).save(grid_path)
    log.info("demo grid (%s): %s", description, grid_path)
    return DemoResult(grid_path, gray_dir, color_dir, description, is_random, report)


# --- the full-pipeline demo ----------------------------------------------------------------------------------

#: Training steps of ``ddcolor demo``: about 2 minutes of atto at 128 px, bf16, batch 4 on 2 AMX cores (~1.3 s/step).
PIPELINE_DEMO_STEPS = 80
#: The demo's recipe on top of the built-in defaults (`ddcolor.config`), whatever params.yaml the working directory has:
#: the packaged ``demo`` recipe (ddcolor/configs/demo.yaml, the reasons beside each value) plus what
#: `pipeline_demo_sections` adds here. Its main numbers, for messages and timings:
_RECIPE = recipe_sections("demo")
PIPELINE_DEMO_PRESET = _RECIPE["model"]["preset"]  # atto: the only encoder that trains in minutes on a CPU
PIPELINE_DEMO_BATCH = _RECIPE["train"]["batch_size"]  # images per step
PIPELINE_DEMO_SIZE = _RECIPE["data"]["size"]  # px: training and evaluation images
PIPELINE_DEMO_INPUT_SIZE = _RECIPE["model"]["input_size"]  # px: network input when colorizing the sample photos
#: Seconds of ``ddcolor demo`` besides training (Prefect start, samples, ingest, validation, evaluation, registry,
#: colorizing the photos), measured on a 2-core AMX Xeon; slower CPUs take longer.
PIPELINE_DEMO_OTHER_S = 40
#: Built-in sample images ingested by ``ddcolor demo`` (`ddcolor.data.samples`).
PIPELINE_DEMO_IMAGES = 48
_BACKBONE_WEIGHTS = ("convnext_atto.d2_in1k", "vgg16_bn")  # encoder init + perceptual loss
_METRIC_WEIGHTS = ("pt_inception", "alexnet")  # FID + LPIPS


def pipeline_demo_sections(
    out: str | os.PathLike[str] = "demo_out", *, steps: int = PIPELINE_DEMO_STEPS, amp: str = "auto"
) -> tuple[dict[str, dict], list[str]]:
    """Section overrides (``{"data": {...}, "train": {...}, ...}``, JSON-ready flow parameters) that make the
    ``train-ddcolor`` pipeline a few-minute CPU demo, and the warnings to show.

    Data goes to ``OUT/data/raw`` and ``OUT/data/shards`` (not the DVC-tracked ``data/``); the model is registered
    as ``ddcolor-demo`` in experiment ``ddcolor-demo``, so the demo never competes with real models. Pretrained
    weights are used when they are in the weights cache; otherwise the demo says loudly that it trains from random
    weights (perceptual loss off: a random VGG is noise) and scores FID/LPIPS with random networks (meaningless).
    """
    from ddcolor import weights

    out = Path(out)
    cached = {row.name for row in weights.status() if row.present}
    sections = recipe_sections("demo")  # the static part (ddcolor/configs/demo.yaml)
    sections["data"].update(source=str(out / "data" / "raw"), shards_uri=str(out / "data" / "shards"))
    sections["train"].update(
        max_steps=steps,
        amp=amp,  # auto: bf16 only where the CPU/GPU has it natively (80x slower emulated on AVX2)
        device="auto" if torch.cuda.is_available() else "cpu",
        checkpoint_every=steps,
    )
    warnings: list[str] = [
        "SMALL-SAMPLE FID: the demo evaluates ~5 images, far below gates.min_fid_images (2048); its FID is mostly "
        "bias and is gated anyway only because the demo sets gates.allow_small_fid_sample: true."
    ]
    missing = [name for name in _BACKBONE_WEIGHTS if name not in cached]
    if missing:
        sections["model"]["pretrained"] = None
        sections["train"]["loss_perceptual"] = 0.0
        warnings.append(
            f"RANDOM-INIT TRAINING: {', '.join(missing)} not in the weights cache ({weights.cache_dir()}), so the demo "
            f"trains atto from random weights without the perceptual loss; after {steps} steps its colors are "
            "crude. For a real start: `ddcolor weights fetch " + " && ddcolor weights fetch ".join(missing) + "`."
        )
    else:
        sections["model"]["pretrained"] = "imagenet"
    missing = [name for name in _METRIC_WEIGHTS if name not in cached]
    if missing:
        sections["eval"]["metric_weights"] = "random"
        warnings.append(
            f"MEANINGLESS FID/LPIPS: {', '.join(missing)} not in the weights cache, so the metric networks are random "
            "(eval.metric_weights=random); colorfulness and PSNR are real. Fetch them for real FID/LPIPS: `ddcolor "
            "weights fetch " + " && ddcolor weights fetch ".join(missing) + "`."
        )
    else:
        sections["eval"]["metric_weights"] = "cache"
    return sections, warnings


def pipeline_demo_params(
    out: str | os.PathLike[str] = "demo_out",
    *,
    steps: int = PIPELINE_DEMO_STEPS,
    precision: str = "auto",
    force: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """The whole ``ddcolor demo`` recipe as ``train-ddcolor`` flow parameters, and the warnings to show.

    ``config_path`` is None: the recipe is the package's built-in defaults plus `pipeline_demo_sections`, never a
    ``params.yaml`` from the working directory (one there must not turn the demo into a large-preset run).

    Args:
        out: the demo's output folder (data, runs, samples).
        steps: training steps.
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` for training (``train.amp``; fp32 = none).
        force: retrain even if the champion has the same data and config.
    """
    amp = {"auto": "auto", "fp32": "none", "bf16": "bf16", "fp16": "fp16"}[precision]
    sections, warnings = pipeline_demo_sections(out, steps=steps, amp=amp)
    params = {
        "config_path": None,
        "source": None,
        **sections,
        "force": force,
        "work_dir": str(out),
        "nproc_per_node": 1,
        "colorize": True,
    }
    return params, warnings


def time_training_step(config: Any) -> float:
    """Seconds of one training step of ``config``'s recipe on this machine, after one warm-up step.

    The step is the trainer's: generator forward under the resolved ``train.amp``, the four losses, the
    discriminator, both backward passes and optimizer steps, on random (B, 3, S, S) batches (B =
    ``train.batch_size``, S = ``data.size``). Weights are random (the speed does not depend on them).
    """
    from ddcolor.devices import resolve_device
    from ddcolor.losses import DDColorLoss, Discriminator, LossWeights, PerceptualLoss
    from ddcolor.model import build_model_from_config
    from ddcolor.precision import resolve_amp

    tc, size = config.train, config.data.size
    device = resolve_device(tc.device)
    amp = resolve_amp(tc.amp, device)
    generator = build_model_from_config(config.model.model_copy(update={"pretrained": None})).to(device).train()
    discriminator = Discriminator(nf=config.model.disc_nf).to(device).train()
    criterion = DDColorLoss(LossWeights.from_config(tc), PerceptualLoss(pretrained=None)).to(device)
    opt_g = torch.optim.AdamW(generator.parameters(), lr=tc.lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=tc.lr_d)
    g = torch.Generator().manual_seed(0)
    lightness = torch.rand(tc.batch_size, 1, size, size, generator=g) * 100.0
    ab = (torch.rand(tc.batch_size, 2, size, size, generator=g) - 0.5) * 60.0
    gray = gray_rgb_from_l(lightness)
    lightness, ab, gray = lightness.to(device), ab.to(device), gray.to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            discriminator.requires_grad_(False)
            pred_ab = generator(gray)
            loss_g, _ = criterion.generator_loss(pred_ab, lightness, ab, discriminator)
        loss_g.backward()
        discriminator.requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_d, _ = criterion.discriminator_loss(pred_ab, lightness, ab, discriminator)
        loss_d.backward()
        for opt in (opt_g, opt_d):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocations, oneDNN kernel selection
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def estimate_demo_seconds(config: Any) -> tuple[float, float]:
    """``(training seconds, whole-demo seconds)`` of ``config`` on this machine: ``train.max_steps`` x one timed
    step (`time_training_step`) + `PIPELINE_DEMO_OTHER_S` for everything else. A few seconds to run."""
    training = config.train.max_steps * time_training_step(config)
    return training, training + PIPELINE_DEMO_OTHER_S


def pipeline_demo_config(params: dict[str, Any]) -> Any:
    """The validated `Config` that the ``train-ddcolor`` flow builds from `pipeline_demo_params` (as the flow does:
    ``load_config(config_path, section_overrides(...))``)."""
    from ddcolor.config import load_config
    from ddcolor.pipeline import section_overrides

    sections = {k: params.get(k) for k in ("data", "validate", "model", "train", "eval", "gates", "registry")}
    return load_config(params["config_path"], section_overrides(**sections))


def estimate_message(config: Any) -> str:
    """One line for the user before the demo starts: how long it will take here, and on what (times one step)."""
    from ddcolor.devices import resolve_device
    from ddcolor.precision import device_description, resolve_amp

    device = resolve_device(config.train.device)
    training, total = estimate_demo_seconds(config)
    tc = config.train
    return (
        f"this machine ({device_description(device)}, train.amp={tc.amp} -> {resolve_amp(tc.amp, device)}): the demo "
        f"takes about {format_duration(total)}, of which training {tc.max_steps} steps of {config.model.preset} "
        f"({config.data.size} px, batch {tc.batch_size}) about {format_duration(training)} (one step timed just now)"
    )


def format_duration(seconds: float) -> str:
    """``95`` -> ``"1 min 35 s"``; ``42`` -> ``"42 s"``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
