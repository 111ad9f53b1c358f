"""Colorize images with a DDColor model: the inference pipeline, the `Colorizer` API and the file runner.

The pipeline is the official one (``inference/colorization_pipeline.py`` of piddnad/DDColor), for any image size:

    image (H, W, 3) sRGB ----------------------------------------------------------> L at full resolution --+
        `-> bilinear resize to S x S -> L -> gray RGB (a = b = 0) -> network -> ab (S x S)                  |
                -> upsample to H x W (nearest: as official; bilinear: smoother) -> clamp to [-128, 127] --+ |
    sRGB <- Lab = [full-resolution L, ab] <-----------------------------------------------------------------+
        -> 8-bit (16-bit for 16-bit input)

Only chrominance comes from the network, so the output keeps the input's full-resolution lightness (up to
quantisation and sRGB gamut clipping). Already colored photos are re-colorized from their L.

Public API:
    Colorizer(model, input_size=512, ab_upsample="bilinear", device="auto", precision="auto", batch_size=1)
        .colorize(image) -> image          numpy uint8 / uint16 / float, (H, W) or (H, W, 1|2|3|4), or PIL image
        .colorize_batch(images) -> list    up to `batch_size` images per forward pass
        .colorize_float(rgbs) -> list      float32 (H, W, 3) sRGB in [0, 1] in and out (the core)
    load_colorization_model(spec, preset=None) -> DDColor      `ddcolor.model.load.load_generator`
    random_init_model(preset="atto", seed=0) -> DDColor        `ddcolor.model.load.random_init_generator`
    colorize_files(colorizer, inputs, out, ...) -> ColorizeReport   (what `ddcolor colorize` runs)
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ddcolor.color import gray_rgb_from_l, lab_to_rgb, rgb_to_lab
from ddcolor.devices import DEVICES, resolve_device
from ddcolor.imageio import (
    DEFAULT_MAX_PIXELS,
    FORMAT_EXTENSIONS,
    IMAGE_EXTENSIONS,
    ImageReadError,
    LoadedImage,
    format_for_path,
    normalize_format,
    pil_to_float,
    read_image,
    to_uint,
    write_image,
)
from ddcolor.model import INPUT_MULTIPLE, DDColor, prepare_for_inference
from ddcolor.model.load import RANDOM_INIT_WARNING, load_generator
from ddcolor.model.load import load_generator as load_colorization_model  # the names the CLI, demo and tests use
from ddcolor.model.load import random_init_generator as random_init_model
from ddcolor.precision import resolve_precision

__all__ = [
    "AB_RANGE",
    "AB_UPSAMPLE_MODES",
    "DEVICES",
    "ENGINES",
    "PRECISIONS",
    "RANDOM_INIT_WARNING",
    "ColorizeReport",
    "Colorizer",
    "Skipped",
    "colorize_files",
    "expand_inputs",
    "load_colorization_model",
    "random_init_model",
    "resolve_device",
]

log = logging.getLogger(__name__)

AB_RANGE = (-128.0, 127.0)  # Lab a*, b* are clamped to this range before Lab -> sRGB
AB_UPSAMPLE_MODES = ("bilinear", "nearest")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where native, else fp32 (ddcolor.precision)
ENGINES = ("torch", "onnx")  # torch: prepare_for_inference; onnx: onnxruntime on the fp32 export


# --- models ---------------------------------------------------------------------------------------------
def _onnx_network(model: DDColor | str | os.PathLike[str], precision: str, device: torch.device):
    """An onnxruntime network for `Colorizer(engine="onnx")`: an `.onnx` file as is, anything else exported first.

    Other models are exported (fp32) to a temporary file that lives as long as the process.
    """
    import tempfile

    from ddcolor.export import OnnxColorModel, export_onnx

    if precision != "fp32":
        raise ValueError(f"the onnx engine runs the fp32 export; got precision {precision!r} (use --engine torch)")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    if not isinstance(model, DDColor) and str(model).endswith(".onnx"):
        return OnnxColorModel(model, providers=providers)
    if not isinstance(model, DDColor):
        model = load_generator(model)
    path = Path(tempfile.mkdtemp(prefix="ddcolor-onnx-")) / "model.onnx"
    log.info("exporting the model to ONNX for the onnx engine: %s", path)
    return OnnxColorModel(export_onnx(model, path), providers=providers)


# --- the pipeline ----------------------------------------------------------------------------------------
@dataclass
class _Decoded:
    """An in-memory input image split into what the pipeline needs and what is needed to return its kind."""

    rgb: np.ndarray  # float32 (H, W, 3) in [0, 1]
    alpha: Any  # the input's own alpha (numpy array of its dtype, or float32 for PIL), or None
    kind: str  # "uint8" | "uint16" | "float" | "pil"


class Colorizer:
    """Colorize images with a DDColor network (see the module docstring for the pipeline).

    Args:
        model: a `DDColor`, or anything `ddcolor.model.load.load_generator` takes (release name, checkpoint path,
            ``models:/`` URI, ``random-init:PRESET:SEED``).
        input_size: side S of the square network input, px; a multiple of 32. 512 as the official pipeline.
        ab_upsample: "bilinear" (smoother color edges) or "nearest" (reproduces the official pipeline).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        precision: "auto" (bf16 on a GPU/CPU with native bf16, else fp32: `ddcolor.precision`), "fp32", "bf16" or
            "fp16" for the network forward; the color math stays float32. ``self.precision`` is the resolved one.
        batch_size: images per forward pass in `colorize_batch` / `colorize_float`.
        engine: "torch" (`prepare_for_inference`) or "onnx" (onnxruntime; `model` may also be an `.onnx` file
            from `ddcolor export-onnx`, other models are exported on the fly).

    Example:
        >>> colorizer = Colorizer("ddcolor_paper_tiny", input_size=512)
        >>> color = colorizer.colorize(np.asarray(Image.open("old_photo.jpg")))  # uint8 (H, W, 3)
    """

    def __init__(
        self,
        model: DDColor | str | os.PathLike[str],
        input_size: int = 512,
        ab_upsample: str = "bilinear",
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 1,
        engine: str = "torch",
    ) -> None:
        if input_size <= 0 or input_size % INPUT_MULTIPLE:
            raise ValueError(f"input_size must be a positive multiple of {INPUT_MULTIPLE}, got {input_size}")
        if ab_upsample not in AB_UPSAMPLE_MODES:
            raise ValueError(f"ab_upsample must be one of {AB_UPSAMPLE_MODES}, got {ab_upsample!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.input_size = input_size
        self.ab_upsample = ab_upsample
        self.batch_size = batch_size
        self.engine = engine
        self.device = resolve_device(device)
        if engine == "onnx" and precision == "auto":
            precision = "fp32"  # the onnx engine runs the fp32 export only
        self.precision = precision = resolve_precision(precision, self.device)
        if engine == "onnx":
            self.net = _onnx_network(model, precision, self.device)
            return
        if not isinstance(model, DDColor):
            model = load_generator(model)
        self.net = prepare_for_inference(model, precision).to(self.device)

    # core: float sRGB in, float sRGB out
    def _network_input(self, rgb: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) sRGB -> (1, 3, S, S) gray RGB: bilinear resize (as cv2.resize), L, a = b = 0."""
        size = (self.input_size, self.input_size)
        small = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=False)
        return gray_rgb_from_l(rgb_to_lab(small.clamp(0.0, 1.0))[:, :1])

    def _combine(self, rgb: torch.Tensor, ab: torch.Tensor) -> np.ndarray:
        """Full-resolution L of (1, 3, H, W) ``rgb`` + (1, 2, S, S) ``ab`` -> float32 (H, W, 3) sRGB in [0, 1]."""
        lightness = rgb_to_lab(rgb)[:, :1]
        options = {"align_corners": False} if self.ab_upsample == "bilinear" else {}
        ab = F.interpolate(ab, size=rgb.shape[-2:], mode=self.ab_upsample, **options).clamp(*AB_RANGE)
        out = lab_to_rgb(torch.cat([lightness, ab], dim=1), clamp=True)
        return out[0].permute(1, 2, 0).float().cpu().numpy()

    @torch.inference_mode()
    def colorize_float(self, rgbs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Colorize float images; the core that every other entry point uses.

        Args:
            rgbs: float (H, W, 3) sRGB in [0, 1], any sizes; each is resized to S x S for the network and
                ``batch_size`` of them go through one forward pass.

        Returns:
            float32 (H, W, 3) sRGB in [0, 1] per input, same sizes, lightness of the input kept.
        """
        outputs: list[np.ndarray] = []
        for start in range(0, len(rgbs), self.batch_size):
            chunk = [
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).permute(2, 0, 1)[None].to(self.device)
                for x in rgbs[start : start + self.batch_size]
            ]
            for x in chunk:
                if x.shape[1] != 3:
                    raise ValueError(f"expected float (H, W, 3) RGB, got {(*x.shape[2:], x.shape[1])}")
            ab = self.net(torch.cat([self._network_input(x) for x in chunk]))  # (B, 2, S, S) float32
            outputs += [self._combine(x, ab[i : i + 1]) for i, x in enumerate(chunk)]
        return outputs

    # in-memory images of any kind
    @staticmethod
    def _decode(image: np.ndarray | Image.Image) -> _Decoded:
        if isinstance(image, Image.Image):
            rgb, alpha, _ = pil_to_float(image)
            return _Decoded(rgb, alpha, "pil")
        if not isinstance(image, np.ndarray):
            raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")
        if image.dtype == np.uint8:
            kind, top = "uint8", 255.0
        elif image.dtype == np.uint16:
            kind, top = "uint16", 65535.0
        elif np.issubdtype(image.dtype, np.floating):
            kind, top = "float", 1.0
        else:
            raise TypeError(f"expected a uint8, uint16 or float image (floats in [0, 1]), got dtype {image.dtype}")
        arr = image[:, :, None] if image.ndim == 2 else image
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
            raise ValueError(
                f"expected an (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4) image, got {image.shape}"
            )
        channels = arr.shape[2]
        color = arr[:, :, :3] if channels >= 3 else np.repeat(arr[:, :, :1], 3, axis=2)
        rgb = np.clip(color.astype(np.float32) / top, 0.0, 1.0)
        alpha = arr[:, :, -1].copy() if channels in (2, 4) else None
        return _Decoded(rgb, alpha, kind)

    @staticmethod
    def _encode(decoded: _Decoded, rgb: np.ndarray) -> np.ndarray | Image.Image:
        if decoded.kind == "pil":
            out = to_uint(rgb, 8)
            if decoded.alpha is not None:
                out = np.concatenate([out, to_uint(decoded.alpha, 8)[:, :, None]], axis=2)
            return Image.fromarray(out)
        out = {"uint8": lambda: to_uint(rgb, 8), "uint16": lambda: to_uint(rgb, 16), "float": lambda: rgb}[
            decoded.kind
        ]()
        if decoded.alpha is not None:
            out = np.concatenate([out, decoded.alpha.astype(out.dtype)[:, :, None]], axis=2)
        return out

    def colorize(self, image: np.ndarray | Image.Image) -> np.ndarray | Image.Image:
        """Colorize one image and return it as the same kind.

        Args:
            image: numpy uint8 / uint16 / float (values in [0, 1]) of shape (H, W), (H, W, 1), (H, W, 2) (gray +
                alpha), (H, W, 3) or (H, W, 4) (RGBA); or a PIL image of any mode `ddcolor.imageio` supports.

        Returns:
            numpy input: (H, W, 3) of the input dtype, or (H, W, 4) with the input's alpha copied exactly.
            PIL input: an RGB or RGBA PIL image (8-bit: PIL has no 16-bit RGB mode). The ICC profile of a PIL
            image is applied, and the result is sRGB.
        """
        return self.colorize_batch([image])[0]

    def colorize_batch(self, images: Sequence[np.ndarray | Image.Image]) -> list[np.ndarray | Image.Image]:
        """Colorize several images (each as `colorize`), ``batch_size`` per forward pass.

        Each image is resized to ``input_size`` x ``input_size`` for the network, so sizes may differ.
        """
        decoded = [self._decode(image) for image in images]
        colored = self.colorize_float([d.rgb for d in decoded])
        return [self._encode(d, rgb) for d, rgb in zip(decoded, colored, strict=True)]


# --- files -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skipped:
    """An input that produced no output.

    Attributes:
        path: the input as found (file path, or the argument that matched nothing).
        reason: why, in words.
        failed: True for errors (bad file, bad argument); False for a deliberate skip (output exists).
    """

    path: str
    reason: str
    failed: bool = True


@dataclass
class ColorizeReport:
    """What `colorize_files` did. Every input is either processed or skipped: ``processed + skipped == inputs``.

    Attributes:
        inputs: number of inputs (image files found, plus arguments that matched no file).
        processed: (input, output) path pairs written.
        skipped: the rest, with reasons.
        seconds: wall time of the run (reading, colorizing, writing).
    """

    inputs: int = 0
    processed: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Skipped]:
        """The skipped inputs that are errors."""
        return [s for s in self.skipped if s.failed]

    @property
    def seconds_per_image(self) -> float:
        """Wall time per processed image (0 when none was processed)."""
        return self.seconds / len(self.processed) if self.processed else 0.0

    def summary(self) -> str:
        """Human-readable multi-line summary: counts, time per image, then every skipped input and why."""
        lines = [
            f"processed {len(self.processed)} of {self.inputs} input(s), skipped {len(self.skipped)} "
            f"({len(self.failed)} failed); {self.seconds_per_image:.2f} s/image"
        ]
        lines += [f"  {'FAILED' if s.failed else 'skipped'} {s.path}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    source: Path
    relative: Path  # output path below the output folder, with the source's suffix


def _is_within(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _walk(folder: Path, root: Path, exclude: Path | None) -> list[_Job]:
    """Image files below ``folder`` (recursive, by extension, hidden files left out), relative to ``root``.

    Files inside ``exclude`` (the output folder, when it lies inside an input folder) are left out, so a rerun does
    not colorize its own outputs; an output folder equal to ``folder`` excludes nothing (the outputs would replace
    the inputs, which `colorize_files` refuses file by file).
    """
    if exclude is not None and exclude == folder.resolve():
        exclude = None
    jobs = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_file() and not _is_within(path.resolve(), exclude):
            jobs.append(_Job(path, path.relative_to(root)))
    return jobs


def expand_inputs(
    inputs: Sequence[str | os.PathLike[str]], exclude: str | os.PathLike[str] | None = None
) -> tuple[list[Path], list[Skipped]]:
    """Expand files, folders (recursive) and glob patterns into image files.

    Args:
        inputs: paths or patterns (``photos/``, ``a.jpg``, ``"scans/**/*.png"``).
        exclude: a folder whose files are never picked up by folder walks or patterns (the output folder).

    Returns:
        ``(files, unmatched)``: the files, de-duplicated, in order (explicitly named files are kept whatever their
        extension; folders and patterns contribute image extensions only); and the arguments that named nothing
        usable, as failed `Skipped` entries.
    """
    jobs, unmatched = _expand(inputs, Path(exclude).resolve() if exclude is not None else None)
    return [job.source for job in jobs], unmatched


def _expand(inputs: Sequence[str | os.PathLike[str]], exclude: Path | None) -> tuple[list[_Job], list[Skipped]]:
    jobs: list[_Job] = []
    unmatched: list[Skipped] = []
    for arg in map(str, inputs):
        path = Path(arg)
        if path.is_file():
            found = [_Job(path, Path(path.name))]
        elif path.is_dir():
            found = _walk(path, path, exclude)
            if not found:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                unmatched.append(Skipped(arg, f"folder holds no image files ({exts})"))
        elif glob.has_magic(arg):
            parts = path.parts
            root = Path(*parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))] or ["."])
            found = []
            for match in map(Path, sorted(glob.glob(arg, recursive=True))):
                if match.is_dir():
                    found += _walk(match, root, exclude)
                elif match.suffix.lower() in IMAGE_EXTENSIONS and not _is_within(match.resolve(), exclude):
                    found.append(_Job(match, match.relative_to(root)))
            if not found:
                unmatched.append(Skipped(arg, "no image files match this pattern"))
        else:
            found = []
            unmatched.append(Skipped(arg, "no such file or folder"))
        jobs += found
    seen: set[Path] = set()
    unique = []
    for job in jobs:
        if job.source.resolve() not in seen:
            seen.add(job.source.resolve())
            unique.append(job)
    return unique, unmatched


def _target(job: _Job, out: Path, out_is_file: bool, fmt: str) -> Path:
    if out_is_file:
        return out
    suffix = job.relative.suffix if job.relative.suffix.lower() in FORMAT_EXTENSIONS[fmt] else FORMAT_EXTENSIONS[fmt][0]
    return out / job.relative.with_suffix(suffix)


def colorize_files(
    colorizer: Colorizer,
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    format: str | None = None,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = False,
) -> ColorizeReport:
    """Colorize image files into a folder (or one file); bad inputs are reported and skipped, the rest run.

    Outputs keep the input's format, bit depth (16-bit for 16-bit PNG/TIFF), alpha and EXIF (orientation reset to
    1) unless ``format`` or an output file name says otherwise. Folder inputs keep their sub-folder layout below
    ``out``. Inputs are never overwritten; existing outputs are skipped unless ``overwrite``.

    Args:
        colorizer: the `Colorizer` to use (its ``batch_size`` images are read, colorized and written together).
        inputs: files, folders (recursive) and glob patterns; see `expand_inputs`.
        out: output folder, or an output file name with an image extension (``out.png``) for a single input.
        format: output format for every file ("png", "jpg", ...); None = each input's own format.
        overwrite: replace existing outputs.
        max_pixels: decompression-bomb guard per image; None = no limit.
        progress: show a tqdm progress bar (on a terminal, for more than one file).

    Returns:
        The `ColorizeReport`; check ``report.failed``.

    Raises:
        ValueError: ``out`` names a file but the inputs hold several images, or ``format`` contradicts the
            extension of ``out``.
    """
    out = Path(out)
    out_is_file = out.suffix.lower() in IMAGE_EXTENSIONS and not out.is_dir()
    fmt_forced = normalize_format(format) if format else None
    if out_is_file:
        out_fmt = format_for_path(out)
        if fmt_forced and fmt_forced != out_fmt:
            raise ValueError(f"--format {format} contradicts the output file name {out} ({out_fmt})")
        fmt_forced = out_fmt
    jobs, unmatched = _expand(inputs, None if out_is_file else out.resolve())
    if out_is_file and len(jobs) > 1:
        raise ValueError(f"-o {out} names a single file but the inputs hold {len(jobs)} images; give an output folder")

    report = ColorizeReport(inputs=len(jobs) + len(unmatched), skipped=list(unmatched))
    for skip in unmatched:
        log.warning("skipped %s: %s", skip.path, skip.reason)
    sources = {job.source.resolve() for job in jobs}
    claimed: dict[Path, Path] = {}  # resolved output -> the input writing it
    pending: list[tuple[_Job, LoadedImage, Path, str]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="img", desc="colorize", disable=None if progress and len(jobs) > 1 else True)

    def skip(job: _Job, reason: str, failed: bool = True) -> None:
        report.skipped.append(Skipped(str(job.source), reason, failed))
        (log.warning if failed else log.info)("skipped %s: %s", job.source, reason)
        bar.update(1)

    def check_target(job: _Job, target: Path) -> tuple[str, bool] | None:
        resolved = target.resolve()
        if resolved in sources:
            return f"output {target} is an input file; inputs are never overwritten (choose another -o)", True
        if resolved in claimed:
            return f"output {target} is already written by {claimed[resolved]} in this run (same name)", True
        if target.is_dir():
            return f"output {target} is a folder", True
        if target.exists() and not overwrite:
            return f"output {target} exists (pass --overwrite to replace it)", False
        return None

    def flush() -> None:
        if not pending:
            return
        try:
            colored = colorizer.colorize_float([image.rgb for _, image, _, _ in pending])
        except (RuntimeError, ValueError) as err:  # e.g. out of device memory: report, keep going
            for job, *_ in pending:
                skip(job, f"colorization failed ({type(err).__name__}: {err})")
            pending.clear()
            return
        for (job, image, target, fmt), rgb in zip(pending, colored, strict=True):
            try:
                write_image(target, rgb, image.alpha, image.bit_depth, fmt, image.exif)
            except (OSError, ValueError) as err:
                skip(job, f"cannot write {target}: {err}")
                continue
            report.processed.append((job.source, target))
            bar.update(1)
        pending.clear()

    try:
        for job in jobs:
            guess = fmt_forced or format_for_path(job.source)
            if guess is not None:  # cheap check before decoding: reruns skip finished files fast
                problem = check_target(job, _target(job, out, out_is_file, guess))
                if problem is not None:
                    skip(job, *problem)
                    continue
            try:
                image = read_image(job.source, max_pixels=max_pixels)
            except ImageReadError as err:
                skip(job, err.reason)
                continue
            fmt = fmt_forced or image.format
            target = _target(job, out, out_is_file, fmt)
            problem = check_target(job, target)
            if problem is not None:
                skip(job, *problem)
                continue
            claimed[target.resolve()] = job.source
            pending.append((job, image, target, fmt))
            if len(pending) >= colorizer.batch_size:
                flush()
        flush()
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report
