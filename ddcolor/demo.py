"""`ddcolor demo`: colorize a few real photos shipped with scikit-image and show the result in one grid image.

Steps: the sample photos (astronaut, coffee, chelsea, rocket, Hubble deep field; those that load offline) are
turned into grayscale PNGs (their CIELAB L) in ``OUT/gray/``, colorized by the same file pipeline as
`ddcolor colorize` into ``OUT/color/``, and ``OUT/grid.png`` shows one row per photo: gray input | colorized |
original.

Model: ``--model`` when given; else the official ``ddcolor_paper_tiny`` release if it is in the weights cache; else
an explicit random-init atto model, with a loud warning that its colors are meaningless.

That is the colorize-only demo (``ddcolor demo --colorize-only``). ``ddcolor demo`` runs the whole ``train-ddcolor``
pipeline first, with the settings of `pipeline_demo_sections` merged onto ``params.yaml``, then colorizes the same
photos with the champion it promoted (`run_demo` with a loaded model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddcolor.color import gray_rgb_from_l, rgb_to_lab
from ddcolor.colorize import RANDOM_INIT_WARNING, Colorizer, ColorizeReport, colorize_files, load_colorization_model
from ddcolor.colorize import random_init_model as _random_init_model
from ddcolor.imageio import to_uint
from ddcolor.model import DDColor

__all__ = [
    "DEFAULT_RELEASE",
    "PIPELINE_DEMO_STEPS",
    "SAMPLES",
    "DemoResult",
    "choose_model",
    "make_grid",
    "pipeline_demo_sections",
    "run_demo",
    "sample_images",
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
    precision: str = "fp32",
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
        precision: "fp32", "bf16" or "fp16".
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

#: Training steps of ``ddcolor demo``: about 2 minutes of atto at 128 px, bf16, batch 4 on 2 CPU cores (~1.3 s/step).
PIPELINE_DEMO_STEPS = 80
#: Built-in sample images ingested by ``ddcolor demo`` (`ddcolor.data.samples`).
PIPELINE_DEMO_IMAGES = 48
_BACKBONE_WEIGHTS = ("convnext_atto.d2_in1k", "vgg16_bn")  # encoder init + perceptual loss
_METRIC_WEIGHTS = ("pt_inception", "alexnet")  # FID + LPIPS


def pipeline_demo_sections(
    out: str | os.PathLike[str] = "demo_out", *, steps: int = PIPELINE_DEMO_STEPS
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
    sections: dict[str, dict] = {
        "data": {
            "source": str(out / "data" / "raw"),
            "shards_uri": str(out / "data" / "shards"),
            "size": 128,  # px: 4x fewer pixels than 256, so a step is several times faster
            "val_fraction": 0.1,  # ~5 of 48 images held out for evaluation
            "num_workers": 0,  # 2 cores: loader workers would only compete with training
        },
        "model": {},
        "train": {
            "max_steps": steps,
            "amp": "bf16",  # CPU and CUDA support bf16 autocast
            "device": "auto" if torch.cuda.is_available() else "cpu",
            "lr": 5e-4,  # a short schedule: a larger step size than the official 1e-4 shows color sooner
            "log_every": 10,
            "checkpoint_every": steps,
        },
        "eval": {"image_size": 128, "batch_size": 8},
        "registry": {"model_name": "ddcolor-demo", "experiment_name": "ddcolor-demo"},
        "gates": {"allow_small_fid_sample": True},
    }
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
