"""Tests of the colorization pipeline, `Colorizer`, `colorize_files`, `ddcolor colorize` and `ddcolor demo`.

All use an explicit random-init atto model (no weights exist offline) at a small network size; the colors are
meaningless, so the tests check what the pipeline guarantees: sizes, kept lightness, alpha, bit depth, formats,
metadata, and the handling of bad inputs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import ExifTags, Image
from skimage.color import rgb2lab
from typer.testing import CliRunner

from ddcolor import colorize as colorize_module
from ddcolor import demo as demo_module
from ddcolor.cli import app
from ddcolor.color import lab_to_rgb
from ddcolor.colorize import AB_RANGE, Colorizer, colorize_files, expand_inputs, load_colorization_model
from ddcolor.imageio import read_image, to_uint
from ddcolor.model import DDColor, build_model
from tests.helpers.images import bad_image_files, load, make_icc, photo, read_png16, save

SIZE = 64  # network input size for the tests (a multiple of 32)
MAX_PIXELS = 20_000  # pixel limit for the bad-input tests: photo() (96 x 128) passes, huge.png does not


@pytest.fixture(scope="module")
def model() -> DDColor:
    torch.manual_seed(0)
    return build_model("atto", pretrained=None).eval()


@pytest.fixture(scope="module")
def colorizer(model) -> Colorizer:
    return Colorizer(model, input_size=SIZE, device="cpu")


@pytest.fixture
def fast_random_init(model, monkeypatch):
    """Make `--random-init` reuse the module's model instead of building one (4 s each) per CLI call."""
    monkeypatch.setattr(colorize_module, "random_init_model", lambda preset="atto", seed=0, warn=True: model)
    monkeypatch.setattr(demo_module, "_random_init_model", lambda preset="atto", seed=0, warn=True: model)


@pytest.fixture
def empty_weights_cache(tmp_path, monkeypatch) -> Path:
    from ddcolor import weights

    directory = tmp_path / "weights-cache"
    monkeypatch.setenv(weights.ENV_VAR, str(directory))
    return directory


def lightness(rgb: np.ndarray) -> np.ndarray:
    """CIELAB L of an 8- or 16-bit RGB image, computed by skimage (independent of ddcolor.color)."""
    top = 255.0 if rgb.dtype == np.uint8 else 65535.0
    return rgb2lab(rgb[:, :, :3].astype(np.float64) / top)[:, :, 0]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# --- the pipeline ----------------------------------------------------------------------------------------


def test_odd_size_keeps_size_and_lightness(colorizer):
    rgb = photo(333, 517)
    out = colorizer.colorize(rgb)
    assert out.shape == (333, 517, 3) and out.dtype == np.uint8
    assert np.abs(lightness(out) - lightness(rgb)).max() < 1.0
    assert not np.array_equal(out, rgb)  # re-colorized from L, not passed through


@pytest.mark.parametrize("shape", [(31, 200), (300, 17), (1, 1), (64, 64)])
def test_any_size_and_aspect_ratio(colorizer, shape):
    rgb = photo(*shape)
    out = colorizer.colorize(rgb)
    assert out.shape == (*shape, 3)
    assert np.abs(lightness(out) - lightness(rgb)).max() < 1.0


def test_nearest_and_bilinear_upsampling(model):
    rgb = photo(150, 230)
    outs = {}
    for mode in ("nearest", "bilinear"):
        outs[mode] = Colorizer(model, input_size=SIZE, ab_upsample=mode, device="cpu").colorize(rgb)
        assert outs[mode].shape == rgb.shape
        assert np.abs(lightness(outs[mode]) - lightness(rgb)).max() < 1.0
    assert not np.array_equal(outs["nearest"], outs["bilinear"])


def test_ab_is_clamped(model):
    """A network that predicts absurd chroma gives the same picture as one that predicts the clamp bound."""
    rgb = photo(40, 60)
    results = []
    for value in (1000.0, AB_RANGE[1]):
        stub = Colorizer(model, input_size=SIZE, device="cpu")
        stub.net = lambda x, v=value: torch.full((x.shape[0], 2, *x.shape[-2:]), v)
        results.append(stub.colorize(rgb))
    np.testing.assert_array_equal(results[0], results[1])
    l_full = torch.from_numpy(rgb2lab(rgb)[:, :, :1]).permute(2, 0, 1)[None].float()
    lab = torch.cat([l_full, torch.full((1, 2, 40, 60), AB_RANGE[1])], dim=1)
    expected = to_uint(lab_to_rgb(lab)[0].permute(1, 2, 0).numpy(), 8)
    assert np.abs(results[0].astype(int) - expected).max() <= 1


def test_batched_equals_single(model):
    images = [photo(50, 70), photo(333, 517), skimage.data.camera()[:90, :120]]
    single = Colorizer(model, input_size=SIZE, device="cpu", batch_size=1)
    batched = Colorizer(model, input_size=SIZE, device="cpu", batch_size=3)
    for one, many in zip(single.colorize_batch(images), batched.colorize_batch(images), strict=True):
        assert one.shape == many.shape
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1


def test_numpy_kinds(colorizer):
    gray = skimage.data.camera()[:45, :61]
    out = colorizer.colorize(gray)
    assert out.shape == (45, 61, 3) and out.dtype == np.uint8
    assert np.abs(lightness(out) - lightness(np.repeat(gray[:, :, None], 3, axis=2))).max() < 1.0

    assert colorizer.colorize(gray[:, :, None]).shape == (45, 61, 3)
    rgba = np.dstack([photo(45, 61), gray])
    out = colorizer.colorize(rgba)
    assert out.shape == (45, 61, 4)
    np.testing.assert_array_equal(out[:, :, 3], gray)  # alpha exactly kept
    la = colorizer.colorize(np.dstack([gray, 255 - gray]))
    assert la.shape == (45, 61, 4)
    np.testing.assert_array_equal(la[:, :, 3], 255 - gray)

    rgb16 = photo(45, 61).astype(np.uint16) * 257
    out16 = colorizer.colorize(rgb16)
    assert out16.dtype == np.uint16 and np.abs(lightness(out16) - lightness(rgb16)).max() < 0.1

    rgbf = photo(45, 61).astype(np.float32) / 255
    outf = colorizer.colorize(rgbf)
    assert outf.dtype == np.float32 and outf.min() >= 0 and outf.max() <= 1

    with pytest.raises(TypeError, match="dtype"):
        colorizer.colorize(np.zeros((8, 8, 3), np.int32))
    with pytest.raises(ValueError, match="expected an"):
        colorizer.colorize(np.zeros((8, 8, 5), np.uint8))


def test_pil_kinds(colorizer):
    rgb = photo(40, 52)
    out = colorizer.colorize(Image.fromarray(rgb))
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (52, 40)
    rgba = Image.fromarray(np.dstack([rgb, rgb[:, :, 0]]))
    out = colorizer.colorize(rgba)
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[:, :, 3], rgb[:, :, 0])
    for mode in ("L", "P", "CMYK", "LA"):
        out = colorizer.colorize(Image.fromarray(rgb).convert(mode))
        assert out.size == (52, 40) and out.mode == ("RGBA" if mode == "LA" else "RGB"), mode
    gray16 = Image.fromarray(skimage.data.camera()[:40, :52].astype(np.uint16) * 257)
    assert colorizer.colorize(gray16).mode == "RGB"  # PIL has no 16-bit RGB: 8-bit back


def test_colorizer_validates_arguments(model):
    with pytest.raises(ValueError, match="multiple of 32"):
        Colorizer(model, input_size=100)
    with pytest.raises(ValueError, match="ab_upsample"):
        Colorizer(model, ab_upsample="bicubic")
    with pytest.raises(ValueError, match="precision"):
        Colorizer(model, precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        Colorizer(model, batch_size=0)


def test_bf16_precision_runs(model):
    out = Colorizer(model, input_size=SIZE, device="cpu", precision="bf16").colorize(photo(40, 50))
    assert out.shape == (40, 50, 3)


def test_model_references(empty_weights_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(FileNotFoundError, match="ddcolor promote"):
        load_colorization_model("models:/ddcolor@champion")
    with pytest.raises(FileNotFoundError, match="ddcolor weights"):
        load_colorization_model("ddcolor_paper_tiny")
    with pytest.raises(FileNotFoundError, match="ddcolor weights"):
        load_colorization_model(tmp_path / "nope.safetensors")


@pytest.mark.slow  # loading a checkpoint builds a model (~5 s)
def test_colorizer_accepts_a_checkpoint_path(model, tmp_path):
    from ddcolor.model.checkpoint import save_checkpoint

    path = save_checkpoint(model, tmp_path / "gen.safetensors")
    rgb = photo(40, 50)
    from_path = Colorizer(path, input_size=SIZE, device="cpu").colorize(rgb)
    from_model = Colorizer(model, input_size=SIZE, device="cpu").colorize(rgb)
    np.testing.assert_array_equal(from_path, from_model)


# --- files: every input kind -----------------------------------------------------------------------------


def test_files_each_input_kind(colorizer, tmp_path):
    rgb = photo(37, 53)
    gray = skimage.data.camera()[:37, :53]
    alpha = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    src = tmp_path / "in"
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "TestCam"
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    save(Image.fromarray(gray), src / "gray.png")
    save(Image.fromarray(rgb), src / "rgb.png")
    save(Image.fromarray(np.dstack([rgb, alpha])), src / "rgba.png")
    save(Image.fromarray(np.dstack([gray, alpha]), "LA"), src / "la.png")
    save(pal, src / "palette.png")
    save(pal, src / "palette_t.png", transparency=3)
    save(Image.fromarray(gray.astype(np.uint16) * 257 + 3), src / "gray16.png")
    save(Image.fromarray(gray.astype(np.uint16) * 257 + 3), src / "gray16.tif")
    save(Image.fromarray(rgb).convert("CMYK"), src / "cmyk.jpg", quality=95)
    save(Image.fromarray(rgb), src / "rotated.jpg", exif=exif, quality=95)
    save(Image.fromarray(rgb), src / "icc.png", icc_profile=make_icc("RGB", gamma=1.0))

    report = colorize_files(colorizer, [src], tmp_path / "out")
    assert not report.skipped and len(report.processed) == report.inputs == 11
    out = tmp_path / "out"

    for name in ("gray.png", "rgb.png", "palette.png", "icc.png"):
        source, result = read_image(src / name), np.asarray(load(out / name))
        assert result.shape == (37, 53, 3), name
        assert np.abs(lightness(result) - lightness(to_uint(source.rgb, 8))).max() < 1.0, name

    for name, expected_alpha in (("rgba.png", alpha), ("la.png", alpha)):
        result = np.asarray(load(out / name))
        assert result.shape == (37, 53, 4), name
        np.testing.assert_array_equal(result[:, :, 3], expected_alpha, err_msg=name)
    assert load(out / "palette_t.png").mode == "RGBA"

    png16 = read_png16(out / "gray16.png")  # 16-bit in, 16-bit out, lightness kept at 16-bit precision
    gray16 = np.repeat((gray.astype(np.uint16) * 257 + 3)[:, :, None], 3, axis=2)
    assert png16.shape == (37, 53, 3) and np.abs(lightness(png16) - lightness(gray16)).max() < 0.05
    import tifffile

    tif16 = tifffile.imread(out / "gray16.tif")
    assert tif16.dtype == np.uint16 and tif16.shape == (37, 53, 3)

    with Image.open(out / "cmyk.jpg") as im:
        assert im.mode == "RGB" and im.size == (53, 37)
    with Image.open(out / "rotated.jpg") as im:
        assert im.size == (37, 53)  # upright: rotated dims
        assert im.getexif()[ExifTags.Base.Orientation] == 1 and im.getexif()[ExifTags.Base.Make] == "TestCam"
    with Image.open(out / "icc.png") as im:
        assert "icc_profile" not in im.info  # sRGB, untagged


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "tif", "bmp"])
def test_files_formats_round_trip(colorizer, tmp_path, ext):
    rgb = photo(41, 59)
    source = save(Image.fromarray(rgb), tmp_path / f"in.{ext}")
    report = colorize_files(colorizer, [source], tmp_path / "out")
    assert len(report.processed) == 1 and not report.skipped
    target = tmp_path / "out" / f"in.{ext}"
    assert report.processed[0] == (source, target)
    with Image.open(target) as im, Image.open(source) as src:
        assert im.format == src.format and im.size == (59, 41)
        result = np.asarray(im.convert("RGB"))
    tolerance = 1.0 if ext in ("png", "tif", "bmp") else 6.0  # JPEG/WebP re-encode
    assert np.abs(lightness(result) - lightness(np.asarray(load(source).convert("RGB")))).max() < tolerance


def test_files_format_option_and_single_output_file(colorizer, tmp_path):
    source = save(Image.fromarray(photo(30, 40)), tmp_path / "a.jpg")
    report = colorize_files(colorizer, [source], tmp_path / "out", format="png")
    assert report.processed[0][1] == tmp_path / "out" / "a.png"
    assert load(tmp_path / "out" / "a.png").format == "PNG"
    report = colorize_files(colorizer, [source], tmp_path / "single.webp")
    assert report.processed == [(source, tmp_path / "single.webp")]
    assert load(tmp_path / "single.webp").format == "WEBP"
    with pytest.raises(ValueError, match="single file"):
        colorize_files(colorizer, [source, save(Image.fromarray(photo(8, 8)), tmp_path / "b.png")], tmp_path / "x.png")
    with pytest.raises(ValueError, match="contradicts"):
        colorize_files(colorizer, [source], tmp_path / "x.png", format="jpg")


def test_files_folders_globs_and_layout(colorizer, tmp_path):
    src = tmp_path / "photos"
    for rel in ("a.png", "sub/b.jpg", "sub/deeper/c.png", ".hidden/d.png", "notes.txt"):
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            save(Image.fromarray(photo(20, 24)), path)
    files, unmatched = expand_inputs([src, str(src / "sub" / "*.jpg"), src / "a.png", "nothing/here.png"])
    assert [f.relative_to(src).as_posix() for f in files] == ["a.png", "sub/b.jpg", "sub/deeper/c.png"]
    assert [u.path for u in unmatched] == ["nothing/here.png"]

    pattern = colorize_files(colorizer, [str(src / "**" / "*.png")], tmp_path / "globbed")
    assert {p.relative_to(tmp_path / "globbed").as_posix() for _, p in pattern.processed} == {
        "a.png",
        "sub/deeper/c.png",
    }

    out = src / "colored"  # output folder inside the input folder: never picked up as input
    report = colorize_files(colorizer, [src], out)
    assert {p.relative_to(out).as_posix() for _, p in report.processed} == {"a.png", "sub/b.jpg", "sub/deeper/c.png"}
    rerun = colorize_files(colorizer, [src], out)  # existing outputs: skipped, not failed
    assert len(rerun.skipped) == 3 and not rerun.failed and "--overwrite" in rerun.skipped[0].reason
    assert len(colorize_files(colorizer, [src], out, overwrite=True).processed) == 3


def test_files_never_overwrite_inputs(colorizer, tmp_path):
    src = tmp_path / "photos"
    a = save(Image.fromarray(photo(20, 24)), src / "a.png")
    before = a.read_bytes()
    for out in (src, src / "a.png"):
        report = colorize_files(colorizer, [a], out, overwrite=True)
        assert not report.processed and report.failed and "never overwritten" in report.failed[0].reason
    report = colorize_files(colorizer, [src], src, overwrite=True)
    assert not report.processed and len(report.failed) == 1
    assert a.read_bytes() == before


def test_files_same_output_name_collision(colorizer, tmp_path):
    a = save(Image.fromarray(photo(20, 24)), tmp_path / "in" / "x.jpg")
    b = save(Image.fromarray(photo(20, 24)), tmp_path / "in" / "x.png")
    report = colorize_files(colorizer, [a, b], tmp_path / "out", format="png")
    assert len(report.processed) == 1 and len(report.failed) == 1 and "already written" in report.failed[0].reason


def _bad_inputs(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    """Good and bad input files in one folder: (good, bad)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    bad = [path for path, _ in bad_image_files(folder).values() if path.suffix != ".gif"]
    bad.append(save(Image.new("RGB", (300, 300)), folder / "huge.png"))  # > MAX_PIXELS, the rest is not
    good = [save(Image.fromarray(photo(30, 40)), folder / f"good{i}.png") for i in range(2)]
    return good, bad


def test_files_bad_inputs_are_reported_and_the_rest_run(colorizer, tmp_path):
    good, bad = _bad_inputs(tmp_path)
    report = colorize_files(colorizer, [tmp_path / "mixed", "missing.png"], tmp_path / "out", max_pixels=MAX_PIXELS)
    assert len(report.processed) == len(good) == 2
    assert len(report.processed) + len(report.skipped) == report.inputs == len(good) + len(bad) + 1
    reasons = {Path(s.path).name: s.reason for s in report.failed}
    assert set(reasons) == {p.name for p in bad} | {"missing.png"}
    assert "empty file" in reasons["empty.jpg"] and "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert "too large" in reasons["huge.png"] and "no such file" in reasons["missing.png"]
    summary = report.summary()
    assert "processed 2 of 8" in summary and all(p.name in summary for p in bad)


# --- the CLI ---------------------------------------------------------------------------------------------


def test_cli_colorize_random_init(fast_random_init, tmp_path):
    source = save(Image.fromarray(photo(33, 45)), tmp_path / "a.jpg")
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--random-init", "--input-size", SIZE)
    assert result.exit_code == 0, result.output
    assert "MEANINGLESS" in result.output and "processed 1 of 1" in result.output
    assert load(tmp_path / "out" / "a.jpg").size == (45, 33)
    result = run_cli(
        "colorize", source, "-o", tmp_path / "out", "--random-init", "--input-size", SIZE, "--format", "png",
        "--ab-upsample", "nearest", "--batch-size", "2", "--device", "cpu", "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.png").is_file()


def test_cli_colorize_bad_inputs_exit_nonzero(fast_random_init, tmp_path):
    good, bad = _bad_inputs(tmp_path)
    result = run_cli(
        "colorize", tmp_path / "mixed", "-o", tmp_path / "out", "--random-init", "--input-size", SIZE,
        "--max-pixels", MAX_PIXELS,
    )  # fmt: skip
    assert result.exit_code == 1
    assert f"processed 2 of {len(good) + len(bad)}" in result.output
    for path in bad:
        assert path.name in result.output
    assert all((tmp_path / "out" / p.name).is_file() for p in good)


def test_cli_model_is_required_and_errors_name_the_fix(empty_weights_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    source = save(Image.fromarray(photo(20, 20)), tmp_path / "a.png")
    result = run_cli("colorize", source, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "ddcolor_paper_tiny" in result.output and "--random-init" in result.output
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--model", "ddcolor_paper_tiny")
    assert result.exit_code == 1 and "ddcolor weights fetch ddcolor_paper_tiny" in result.output
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--model", tmp_path / "missing.safetensors")
    assert result.exit_code == 1 and "ddcolor weights" in result.output
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--model", "models:/ddcolor@champion")
    assert result.exit_code == 1 and "cannot load 'models:/ddcolor@champion'" in result.output
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--model", "x", "--random-init")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_cli_bad_input_size(fast_random_init, tmp_path):
    source = save(Image.fromarray(photo(20, 20)), tmp_path / "a.png")
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--random-init", "--input-size", "100")
    assert result.exit_code == 1 and "multiple of 32" in result.output


@pytest.mark.slow
def test_cli_colorize_builds_a_real_random_init_model(tmp_path):
    source = save(Image.fromarray(photo(33, 45)), tmp_path / "a.png")
    result = run_cli("colorize", source, "-o", tmp_path / "out", "--random-init", "--input-size", SIZE)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "a.png").is_file()


# --- the demo --------------------------------------------------------------------------------------------


def test_demo_falls_back_to_random_init_with_a_warning(fast_random_init, empty_weights_cache, tmp_path, caplog):
    result = demo_module.run_demo(tmp_path / "demo", input_size=SIZE, samples=("camera", "coffee", "no_such_sample"))
    assert result.random_init and result.model == "random-init atto"
    assert "MEANINGLESS" in caplog.text and "ddcolor weights fetch ddcolor_paper_tiny" in caplog.text
    assert sorted(p.name for p in result.gray_dir.iterdir()) == ["camera.png", "coffee.png"]
    assert load(result.gray_dir / "coffee.png").mode == "L"
    assert load(result.color_dir / "coffee.png").size == (600, 400)
    with Image.open(result.grid) as grid:
        assert grid.size == (3 * demo_module.TILE, demo_module.HEADER + 2 * demo_module.TILE)


def test_demo_uses_cached_release_when_present(empty_weights_cache, monkeypatch, model, tmp_path):
    from ddcolor import weights

    spec = weights.get_spec(demo_module.DEFAULT_RELEASE)
    empty_weights_cache.mkdir(parents=True)
    (empty_weights_cache / spec.filename).write_bytes(b"stub")
    loaded = []
    monkeypatch.setattr(demo_module, "load_colorization_model", lambda name: loaded.append(name) or copy.copy(model))
    _, description, is_random = demo_module.choose_model()
    assert loaded == [demo_module.DEFAULT_RELEASE] and description == demo_module.DEFAULT_RELEASE and not is_random


def test_cli_demo(fast_random_init, empty_weights_cache, tmp_path):
    result = run_cli("demo", "--random-init", "--out", tmp_path / "demo", "--input-size", SIZE)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "grid.png").is_file() and "grid:" in result.output and "meaningless" in result.output
    assert len(list((tmp_path / "demo" / "color").glob("*.png"))) == len(demo_module.sample_images())


def test_cli_demo_colorize_only_flag(fast_random_init, empty_weights_cache, tmp_path):
    result = run_cli("demo", "--colorize-only", "--out", tmp_path / "demo", "--input-size", SIZE)
    assert result.exit_code == 0, result.output
    assert "random-init atto" in result.output and (tmp_path / "demo" / "grid.png").is_file()
    assert not (tmp_path / "demo" / "data").exists()  # no pipeline ran


@pytest.mark.slow
def test_cli_demo_colorize_only_end_to_end(empty_weights_cache, tmp_path):
    """`ddcolor demo --colorize-only` without weights (builds its own random-init model)."""
    result = run_cli("demo", "--colorize-only", "--out", tmp_path / "demo")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "grid.png").is_file()


def test_pipeline_demo_without_weights_says_so(empty_weights_cache, tmp_path):
    sections, warnings = demo_module.pipeline_demo_sections(tmp_path / "demo", steps=5)
    assert sections["model"]["pretrained"] is None and sections["train"]["loss_perceptual"] == 0.0
    assert sections["eval"]["metric_weights"] == "random" and sections["train"]["max_steps"] == 5
    assert sections["data"]["shards_uri"] == str(tmp_path / "demo" / "data" / "shards")
    assert sections["registry"]["model_name"] == "ddcolor-demo"
    assert len(warnings) == 3 and "SMALL-SAMPLE FID" in warnings[0] and sections["gates"]["allow_small_fid_sample"]
    assert "RANDOM-INIT TRAINING" in warnings[1] and "MEANINGLESS FID/LPIPS" in warnings[2]
    assert "ddcolor weights fetch convnext_atto.d2_in1k" in warnings[1]


def test_pipeline_demo_uses_cached_weights(empty_weights_cache, tmp_path):
    from ddcolor import weights

    empty_weights_cache.mkdir(parents=True)
    for name in ("convnext_atto.d2_in1k", "vgg16_bn", "pt_inception", "alexnet"):
        (empty_weights_cache / weights.get_spec(name).filename).write_bytes(b"stub")
    sections, warnings = demo_module.pipeline_demo_sections(tmp_path / "demo")
    # Real weights silence the random-weights warnings; the demo's tiny val split still gets the small-FID one.
    assert len(warnings) == 1 and "SMALL-SAMPLE FID" in warnings[0] and sections["model"]["pretrained"] == "imagenet"
    assert sections["eval"]["metric_weights"] == "cache" and "loss_perceptual" not in sections["train"]


def test_cli_pipeline_rejects_bad_overrides_before_starting(tmp_path):
    result = run_cli("pipeline", "train.lrr=1", "--work-dir", tmp_path / "p")
    assert result.exit_code == 2 and "unknown key" in result.output
    result = run_cli("pipeline", "max_steps=1", "--work-dir", tmp_path / "p", "--config", tmp_path / "none.yaml")
    assert result.exit_code == 2
    assert not (tmp_path / "p").exists()
