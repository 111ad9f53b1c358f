"""The MLflow serving model of a DDColor generator: `DDColorPyfunc` (pyfunc flavor) and its `model_signature`.

`ddcolor.tracking.MlflowTracker.log_model` logs a generator checkpoint with it; load it with
``mlflow.pyfunc.load_model(uri)`` or serve it with ``mlflow models serve -m <uri>``. The model carries what serving
needs: the ddcolor package source (`package_code_path`, MLflow ``code_paths``: no index has ddcolor), its core
requirements pinned to the versions of the logging environment (`serving_requirements`), and an input example
(`input_example`, saved as ``serving_input_example.json`` for ``mlflow.models.validate_serving_input``).

The only tracking module that imports `ddcolor.colorize` (inside `DDColorPyfunc`, on first prediction), so the rest
of `ddcolor.tracking` stays below the inference layer. ``DDColorPyfunc`` subclasses an mlflow class, so it is
defined on first access (module ``__getattr__``), not at import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [  # noqa: F822 - DDColorPyfunc: see __getattr__
    "DDColorPyfunc",
    "checkpoint_config_file",
    "input_example",
    "model_signature",
    "package_code_path",
    "serving_requirements",
]

#: What the serving model imports: ddcolor's core dependencies (pyproject.toml ``dependencies``), pinned at logging.
SERVING_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pillow",
    "safetensors",
    "pyyaml",
    "pydantic",
    "typer",
    "tqdm",
    "tifffile",
    "huggingface-hub",
    "fsspec",
    "python-dotenv",
)
#: Side of the square network input used by the input example (small: MLflow predicts on it when logging).
EXAMPLE_INPUT_SIZE = 64


def serving_requirements() -> list[str]:
    """``name==version`` for each of `SERVING_PACKAGES`, the versions installed here (what the model was logged with).

    A local version label (``2.14.1+cu130``) is dropped: the same release from another index (CPU or CUDA wheels)
    serves the same network. MLflow adds ``mlflow==<version>`` itself.
    """
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def package_code_path() -> str:
    """The folder of the imported ``ddcolor`` package, logged as the model's ``code_paths`` entry."""
    import ddcolor

    return str(Path(ddcolor.__file__).resolve().parent)


def input_example() -> tuple[Any, dict[str, int]]:
    """A small uint8 (1, 32, 48, 3) RGB image and params ``{"input_size": 64}`` (MLflow's ``(data, params)`` form)."""
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    return image, {"input_size": EXAMPLE_INPUT_SIZE}


def checkpoint_config_file(checkpoint: Path, tmp: Path) -> Path:
    """The JSON config beside `checkpoint`, or one written into folder `tmp` from the safetensors metadata.

    Raises:
        FileNotFoundError: neither a ``.json`` beside it nor a ddcolor config in its metadata.
    """
    sidecar = checkpoint.with_suffix(".json")
    if sidecar.is_file():
        return sidecar
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "ddcolor" not in metadata:
        raise FileNotFoundError(f"{checkpoint}: no {sidecar.name} beside it and no config in its metadata")
    out = tmp / sidecar.name
    out.write_text(json.dumps(json.loads(metadata["ddcolor"]), indent=2) + "\n")
    return out


def model_signature() -> Any:
    """The pyfunc signature: uint8 (B,H,W,3) RGB images -> uint8 (B,H,W,3) colorized RGB; B, H, W free.

    Param ``input_size`` (int, default 512): side of the square network input (a multiple of 32).
    """
    import numpy as np
    from mlflow.models import infer_signature
    from mlflow.types.schema import Schema, TensorSpec

    example = np.zeros((1, 8, 8, 3), np.uint8)
    signature = infer_signature(example, example, params={"input_size": 512})
    signature.inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    signature.outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    return signature


def _make_pyfunc_class() -> type:
    """Define `DDColorPyfunc` (it subclasses an mlflow class, so it is built on first use, not at import)."""
    if "DDColorPyfunc" in globals():
        return globals()["DDColorPyfunc"]
    import mlflow.pyfunc

    class DDColorPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc wrapper of a DDColor generator checkpoint.

        Artifacts: ``checkpoint`` (our ``.safetensors``) and ``config`` (its JSON). ``predict`` takes

        * images: uint8 (B, H, W, 3) RGB or (B, H, W) gray, any H, W (one size per batch) -> colorized uint8
          (B, H, W, 3) RGB through `ddcolor.colorize.Colorizer` (param ``input_size``, default 512), or
        * the network contract: float32 (B, 3, H, W) gray RGB in [0, 1] (H, W multiples of 32) -> ab
          (B, 2, H, W) float32, exactly like ``DDColor.forward``.

        The logged signature declares the image contract (uint8 (B, H, W, 3)), which ``PyFuncModel.predict`` and
        ``mlflow models serve`` enforce; the other two inputs reach ``unwrap_python_model().predict(None, x)``.
        """

        # The model has a tensor signature; no type-hint based input validation (and no warning asking for hints).
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            from ddcolor.devices import resolve_device
            from ddcolor.model.load import load_generator

            self.device = resolve_device("auto")
            self.model = load_generator(context.artifacts["checkpoint"], device=self.device)
            self._colorizers: dict[int, Any] = {}

        def _colorizer(self, input_size: int) -> Any:
            from ddcolor.colorize import Colorizer

            colorizers = self.__dict__.setdefault("_colorizers", {})
            if input_size not in colorizers:
                colorizers[input_size] = Colorizer(
                    self.model, input_size=input_size, device=str(self.device), batch_size=8
                )
            return colorizers[input_size]

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate by them
            import numpy as np
            import torch

            x = np.asarray(model_input)
            if np.issubdtype(x.dtype, np.floating) and x.ndim in (3, 4) and x.shape[-3] == 3:
                # the network contract: (B, 3, H, W) (or one (3, H, W)) gray RGB in [0, 1] -> ab
                x = np.ascontiguousarray(x, dtype=np.float32)
                if x.ndim == 3:
                    x = x[None]
                with torch.inference_mode():
                    ab = self.model(torch.from_numpy(x).to(self.device))
                return ab.float().cpu().numpy()
            if x.ndim == 4 and x.shape[-1] == 1:
                x = x[..., 0]
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] == 3)):
                raise ValueError(
                    f"expected uint8 (B, H, W, 3) RGB or (B, H, W) gray images, or float32 (B, 3, H, W) gray RGB; "
                    f"got {x.dtype} {x.shape}"
                )
            if x.dtype != np.uint8:
                if np.issubdtype(x.dtype, np.floating) or x.min() < 0 or x.max() > 255:
                    raise ValueError(f"images must be uint8 (0..255), got {x.dtype}")
                x = x.astype(np.uint8)
            input_size = int((params or {}).get("input_size", 512) or 512)
            colored = self._colorizer(input_size).colorize_batch(list(x))
            return np.stack(colored).astype(np.uint8, copy=False)

    DDColorPyfunc.__module__ = __name__
    DDColorPyfunc.__qualname__ = "DDColorPyfunc"
    globals()["DDColorPyfunc"] = DDColorPyfunc  # importable by reference, so cloudpickle stores no code
    return DDColorPyfunc


def __getattr__(name: str) -> Any:
    if name == "DDColorPyfunc":
        return _make_pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
