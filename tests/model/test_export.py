"""ONNX export: onnxruntime matches PyTorch at several batch sizes and resolutions from ONE exported file.

The atto file is exported through the CLI (`ddcolor export-onnx --model CHECKPOINT`), which also covers
`load_model`; parity is checked against the eager `DDColor` module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from ddcolor.cli import app
from ddcolor.export import OnnxColorModel, export_onnx
from ddcolor.model import DDColor, build_model
from ddcolor.model.checkpoint import save_checkpoint
from tests.helpers.models import randomise_norms

ONNX_TOL = 1e-3  # max |ab_onnx - ab_torch|, Lab units


def eager(model: DDColor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_parity(model: DDColor, net: OnnxColorModel, cases) -> None:
    for batch, height, width in cases:
        x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(batch * height + width))
        ab = net(x)
        assert ab.shape == (batch, 2, height, width) and ab.dtype == torch.float32
        assert (ab - eager(model, x)).abs().max().item() <= ONNX_TOL


@pytest.fixture(scope="module")
def atto() -> DDColor:
    torch.manual_seed(0)
    return randomise_norms(build_model("atto", pretrained=None))


@pytest.fixture(scope="module")
def atto_onnx(atto, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = save_checkpoint(atto, folder / "atto.safetensors")
    out = folder / "atto.onnx"
    result = CliRunner().invoke(app, ["export-onnx", "--model", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    return out


def test_atto_parity_dynamic_batch_and_size(atto, atto_onnx):
    """Two batch sizes and three resolutions (square, portrait, landscape) on the same file."""
    net = OnnxColorModel(atto_onnx, providers=["CPUExecutionProvider"])
    assert_parity(atto, net, [(1, 64, 64), (3, 128, 96), (2, 96, 224)])


def test_graph_io_names_and_dynamic_axes(atto_onnx):
    graph = onnx.load(str(atto_onnx), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["gray_rgb"]
    assert [o.name for o in graph.output] == ["ab"]
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
        assert dims[1].dim_value == (3 if value.name == "gray_rgb" else 2)
    assert onnx.load(str(atto_onnx), load_external_data=False).opset_import[0].version >= 17


def test_non_multiple_of_32(atto_onnx):
    """The wrapper refuses as the torch module does; the raw graph fails inside onnxruntime (shape error)."""
    net = OnnxColorModel(atto_onnx)
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.rand(1, 3, 80, 64))
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    for height, width in [(80, 64), (33, 64)]:  # Concat mismatch in the decoder; final Add mismatch
        with pytest.raises(Fail):
            net.session.run(["ab"], {"gray_rgb": np.random.rand(1, 3, height, width).astype(np.float32)})


def test_wrapper_contract(atto_onnx):
    net = OnnxColorModel(atto_onnx)
    assert net.eval() is net and net.to("cpu") is net  # drop-in for the torch module in the Colorizer
    assert "CPUExecutionProvider" in net.providers
    x = np.random.rand(1, 3, 64, 64).astype(np.float32)
    assert np.array_equal(net.run_numpy(x), net(torch.from_numpy(x)).numpy())
    with pytest.raises(ValueError, match="shape"):
        net(torch.rand(3, 64, 64))


def test_export_errors(atto, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(atto, tmp_path / "a.onnx", opset=16)
    with pytest.raises(ValueError, match="multiple"):
        export_onnx(atto, tmp_path / "a.onnx", sample_size=(64, 80))
    with pytest.raises(FileNotFoundError):
        OnnxColorModel(tmp_path / "missing.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_cli_needs_a_model(tmp_path):
    result = CliRunner().invoke(app, ["export-onnx", "-o", str(tmp_path / "a.onnx")])
    assert result.exit_code != 0
    result = CliRunner().invoke(app, ["export-onnx", "--model", str(tmp_path / "nope.pth"), "-o", "a.onnx"])
    assert result.exit_code == 1 and "not found" in result.output


@pytest.mark.slow
def test_tiny_parity_dynamic_batch_and_size(tmp_path):
    torch.manual_seed(0)
    model = randomise_norms(build_model("tiny", pretrained=None))
    path = export_onnx(model, tmp_path / "tiny.onnx")
    net = OnnxColorModel(path, providers=["CPUExecutionProvider"])
    assert_parity(model, net, [(1, 64, 96), (2, 128, 128)])


def test_colorize_with_onnx_engine_matches_torch(atto, atto_onnx, tmp_path):
    """`ddcolor colorize` with an .onnx --model gives the torch engine's pixels within 1 level."""
    from PIL import Image
    from skimage import data

    from ddcolor.colorize import Colorizer

    photo = data.coffee()[::4, ::4]  # (100, 150, 3) uint8
    by_torch = Colorizer(atto, input_size=64, precision="fp32").colorize(photo)
    by_onnx = Colorizer(str(atto_onnx), input_size=64, engine="onnx").colorize(photo)
    assert np.abs(by_torch.astype(int) - by_onnx.astype(int)).max() <= 1

    Image.fromarray(photo).save(tmp_path / "in.png")
    result = CliRunner().invoke(
        app,
        ["colorize", str(tmp_path / "in.png"), "-o", str(tmp_path / "out"), "-m", str(atto_onnx), "--input-size", "64"],
    )
    assert result.exit_code == 0, result.output
    written = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    assert np.abs(written.astype(int) - by_torch.astype(int)).max() <= 1


@pytest.mark.slow
def test_onnx_engine_exports_a_torch_model_on_the_fly(atto):
    """`Colorizer(model, engine="onnx")` exports the module itself (one more export: slow)."""
    from skimage import data

    from ddcolor.colorize import Colorizer

    photo = data.coffee()[::4, ::4]
    by_torch = Colorizer(atto, input_size=64, precision="fp32").colorize(photo)
    by_onnx = Colorizer(atto, input_size=64, engine="onnx").colorize(photo)
    assert np.abs(by_torch.astype(int) - by_onnx.astype(int)).max() <= 1
