"""ONNX export of the inference network, and an onnxruntime wrapper with the torch module's contract.

The exported graph is `prepare_for_inference(model, "fp32")` (all folds applied, the last stage untiled):
input `gray_rgb` float32 (B, 3, H, W) in [0, 1], output `ab` float32 (B, 2, H, W) in Lab units, with
batch, height and width dynamic. H and W must be multiples of 32, as for the torch module: the graph has
no such check (ONNX cannot raise a readable error), and every other size fails inside onnxruntime with a
shape error: at a decoder Concat when the upsampled features no longer line up with the encoder skips, or
at the final Add when they do but the stride-4 grid does not cover the input. `OnnxColorModel` checks the
size first and raises the same `ValueError` as `DDColor.forward`.

Exporter: the current `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript, the `onnx` extra); the
deprecated TorchScript exporter is not used. It names the output's spatial axes by their derivation
(``32*((height//32))``); they are renamed ``height`` / ``width``, which they equal for the inputs the graph
accepts (multiples of 32).

The exporter's onnxscript optimizer pass is off by default (``optimize=False``): on atto it cost 19 s of the 54 s CPU
time of an export (measured on the 2-core build machine: 35 s CPU without it), and onnxruntime folds constants and
fuses the same nodes itself when it loads the graph (`OnnxColorModel` uses ``ORT_ENABLE_ALL``). The file is larger
in node count (about 4 600 nodes against 1 200 for atto), not in weights. ``optimize=True`` gives the compact graph
for other runtimes.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddcolor import storage
from ddcolor._optional import require
from ddcolor.model.ddcolor import INPUT_MULTIPLE, DDColor, check_gray_rgb_shape
from ddcolor.model.inference import InferenceDDColor, prepare_for_inference

__all__ = ["INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "OnnxColorModel", "export_onnx"]

log = logging.getLogger(__name__)

INPUT_NAME = "gray_rgb"
OUTPUT_NAME = "ab"
MIN_OPSET = 17  # LayerNormalization
DEFAULT_OPSET = 18  # the dynamo exporter's own opset: no version conversion


def _export_module(model: DDColor | InferenceDDColor) -> InferenceDDColor:
    if isinstance(model, InferenceDDColor):
        if model.precision != "fp32":
            raise ValueError(f"export an fp32 network, got one prepared for {model.precision}")
        module = copy.deepcopy(model)
    elif isinstance(model, DDColor):
        module = prepare_for_inference(model, "fp32")
    else:
        raise TypeError(f"expected a DDColor (or an fp32 InferenceDDColor), got {type(model).__name__}")
    module.tile_tokens = None  # one GEMM for the last stage: a Python loop over tiles would be unrolled
    module.channels_last = False  # memory layout means nothing in ONNX
    return module.cpu().eval()


def export_onnx(
    model: DDColor | InferenceDDColor,
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
    *,
    sample_size: tuple[int, int] = (64, 96),
    check: bool = True,
    optimize: bool = False,
) -> Path:
    """Export the fp32 inference network to ONNX with dynamic batch, height and width.

    Args:
        model: a `DDColor` (it is prepared with `prepare_for_inference(model, "fp32")`; `model` itself is
            not modified), or an fp32 `InferenceDDColor`.
        path: output `.onnx` file (parent folders are created; written atomically).
        opset: ONNX opset, >= 17 (18 is the exporter's own; 17 is converted down).
        sample_size: (H, W) of the example input, multiples of 32; the result accepts any multiple of 32.
        check: run `onnx.checker` on the result.
        optimize: run the exporter's onnxscript optimizer (constant folding, redundancy removal): a compact graph
            for runtimes that do not optimize on load, at about +50 % export time; onnxruntime does not need it.

    Returns:
        The path written.

    Raises:
        ValueError: opset < 17, or a sample size that is not a multiple of 32.
    """
    onnx = require("onnx", "onnx", "ONNX export")
    require("onnxscript", "onnx", "the torch.onnx exporter")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")
    height, width = sample_size
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE or height <= 0 or width <= 0:
        raise ValueError(f"sample_size must be positive multiples of {INPUT_MULTIPLE}, got {sample_size}")
    module = _export_module(model)
    sample = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        program = torch.onnx.export(
            module,
            (sample,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            dynamo=True,
            optimize=optimize,  # see the module docstring: onnxruntime optimizes on load
            verbose=False,
        )
    proto = program.model_proto
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    for dim, name in zip(dims, ("batch", None, "height", "width"), strict=True):
        if name is not None:
            dim.dim_param = name  # `32*((height//32))` etc.: equal for every accepted input

    def save(tmp: str) -> None:
        onnx.save(proto, tmp)
        if check:  # a model that fails the check never replaces the file at `path`
            onnx.checker.check_model(tmp)

    path = Path(path)
    storage.write_local_atomic(path, save)
    log.info("exported %s (opset %d)", path, opset)
    return path


def _default_providers() -> list[str]:
    ort = require("onnxruntime", "onnx", "the onnx engine")

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxColorModel:
    """An exported DDColor network behind onnxruntime, callable like the torch module.

    Args:
        path: an `.onnx` file from `export_onnx`.
        providers: onnxruntime execution providers, in order of preference; default CUDA when onnxruntime
            has it, then CPU.
        intra_op_threads: CPU threads per operator (None: onnxruntime's default, all cores).

    Example:
        >>> net = OnnxColorModel("ddcolor_tiny.onnx")
        >>> ab = net(gray_rgb)  # torch (B, 3, H, W) float32 -> torch (B, 2, H, W) float32
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        *,
        intra_op_threads: int | None = None,
    ) -> None:
        ort = require("onnxruntime", "onnx", "the onnx engine")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self.path = path
        self.session = ort.InferenceSession(
            str(path), options, providers=list(providers) if providers is not None else _default_providers()
        )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ValueError(
                f"{path}: not a DDColor export (inputs {[i.name for i in inputs]}, outputs "
                f"{[o.name for o in outputs]}; expected {INPUT_NAME!r} -> {OUTPUT_NAME!r})"
            )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_numpy(self, gray_rgb: np.ndarray) -> np.ndarray:
        """float32 (B, 3, H, W) gray RGB in [0, 1] -> float32 (B, 2, H, W) ab; H, W multiples of 32.

        Raises:
            ValueError: wrong rank, channel count, or a size that is not a multiple of 32.
        """
        check_gray_rgb_shape(gray_rgb.shape)
        feed = np.ascontiguousarray(gray_rgb, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: feed})[0]

    def __call__(self, gray_rgb: torch.Tensor) -> torch.Tensor:
        """Same contract as `DDColor.forward`: torch (B, 3, H, W) -> float32 (B, 2, H, W) on the input's device."""
        ab = self.run_numpy(gray_rgb.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(ab).to(gray_rgb.device)

    # no-ops so that code written for the torch module (`net.eval().to(device)`) works unchanged
    def eval(self) -> OnnxColorModel:
        return self

    def to(self, *args, **kwargs) -> OnnxColorModel:
        return self

    def __repr__(self) -> str:
        return f"OnnxColorModel({str(self.path)!r}, providers={self.providers})"
