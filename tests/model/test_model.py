"""Model layer: shapes, gradients, official-checkpoint loading and numeric parity with the official code.

All models here use explicit random initialisation (`pretrained=None`) or the regenerated fixture weights.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddcolor.model import (
    OFFICIAL_RELEASES,
    CheckpointError,
    DDColor,
    build_model,
    build_model_from_config,
    load_official,
    prepare_for_inference,
)
from ddcolor.model.checkpoint import load_model, save_checkpoint
from tests.helpers.official import FIXTURES, fixture_state_dict, load_manifest, random_state_dict


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.fixture(scope="module")
def tiny_fixture_state(manifest):
    return fixture_state_dict(manifest["tiny"])


@pytest.fixture(scope="module")
def tiny_model():
    return build_model("tiny", pretrained=None)


@pytest.fixture(scope="module")
def atto_model():
    torch.manual_seed(0)
    return build_model("atto", pretrained=None)


# --- architecture ------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(64, 64), (96, 160)])
def test_forward_shape_and_finite(atto_model, height, width):
    gray = torch.rand(2, 3, height, width)
    with torch.no_grad():
        ab = atto_model.eval()(gray)
    assert ab.shape == (2, 2, height, width)
    assert ab.dtype == torch.float32
    assert torch.isfinite(ab).all()


@pytest.mark.slow
def test_every_parameter_gets_a_gradient():
    model = build_model("atto", pretrained=None).train()
    model(torch.rand(2, 3, 64, 64)).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"No (finite) gradient for {missing[:5]}"


def test_encoder_channels_follow_feature_info(atto_model):
    encoder = atto_model.encoder
    assert encoder.channels == encoder.backbone.feature_info.channels() == [40, 80, 160, 320]
    features = encoder(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == encoder.channels
    assert [64 // f.shape[-1] for f in features] == encoder.reductions == [4, 8, 16, 32]


def test_decoder_cycles_scales_and_uses_queries(atto_model):
    decoder = atto_model.color_decoder
    assert decoder.num_layers == 9 and decoder.num_feature_levels == 3
    assert decoder.query_feat.weight.shape == (100, 256)
    assert atto_model.pixel_decoder.scale_channels == [512, 512, 256]


@pytest.mark.parametrize("shape", [(1, 3, 60, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_bad_input_shape_is_a_clear_error(atto_model, shape):
    with pytest.raises(ValueError, match=r"multiple of 32|expected gray RGB"):
        atto_model(torch.rand(*shape))


def test_no_forward_hooks(atto_model):
    hooked = [name for name, module in atto_model.named_modules() if module._forward_hooks or module._forward_pre_hooks]
    assert not hooked


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("no_such_backbone", pretrained=None)
    with pytest.raises(ValueError, match="preset='large'"):
        build_model("tiny", pretrained="ddcolor_paper")
    with pytest.raises(ValueError, match="pretrained must be"):
        build_model("atto", pretrained="imagenet21k")


def test_missing_pretrained_weights_name_the_command(tmp_path, monkeypatch):
    from ddcolor.weights import WeightsNotFoundError

    monkeypatch.setenv("DDCOLOR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"ddcolor weights fetch convnext_atto\.d2_in1k"):
        build_model("atto", pretrained="imagenet")
    with pytest.raises(WeightsNotFoundError, match="ddcolor weights fetch ddcolor_paper_tiny"):
        build_model("tiny", pretrained="ddcolor_paper_tiny")


def test_imagenet_weights_come_from_the_cache(tmp_path, monkeypatch):
    """`pretrained="imagenet"` loads the encoder from the cached file (here: a file we make ourselves)."""
    import timm

    from ddcolor import weights

    monkeypatch.setenv("DDCOLOR_WEIGHTS_DIR", str(tmp_path))
    source = timm.create_model("convnext_atto", pretrained=False)
    torch.nn.init.constant_(source.stem[0].weight, 0.125)
    file = tmp_path / "upload.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(file))
    weights.import_file(file, name="convnext_atto.d2_in1k")
    model = build_model("atto", pretrained="imagenet")
    assert torch.equal(model.encoder.backbone.stem_0.weight, source.stem[0].weight)


# --- official checkpoints ----------------------------------------------------------------------------


def test_tiny_parity_with_official_implementation(tiny_model, tiny_fixture_state):
    """Regenerated fixture weights reproduce the official tiny model's output within 1e-4."""
    load_official(tiny_model, {"params": tiny_fixture_state})
    gray = torch.from_numpy(np.load(FIXTURES / "parity_tiny_input.npy"))
    expected = np.load(FIXTURES / "parity_tiny_expected_ab.npy")
    with torch.no_grad():
        ab = tiny_model.eval()(gray).numpy()
    assert ab.shape == expected.shape == (1, 2, 128, 128)
    np.testing.assert_allclose(ab, expected, rtol=0, atol=1e-4)
    with torch.no_grad():
        fast = prepare_for_inference(tiny_model)(gray).numpy()
    np.testing.assert_allclose(fast, expected, rtol=0, atol=1e-4)


def test_tiny_state_dict_has_440_entries(tiny_model, manifest):
    assert len(manifest["tiny"]) == 440
    # ours = official minus the unused final encoder norm (weight, bias)
    assert len(tiny_model.state_dict()) == 440 - 2
    assert sum(p.numel() for p in tiny_model.parameters()) == pytest.approx(55.0e6, rel=0.01)


@pytest.mark.parametrize("wrapper", ["params", "params_ema", "raw"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_wrappers_and_prefixes(tiny_model, tiny_fixture_state, wrapper, prefix):
    state = {prefix + k: v for k, v in tiny_fixture_state.items()}
    load_official(tiny_model, state if wrapper == "raw" else {wrapper: state})
    assert torch.equal(tiny_model.refine.weight_orig, tiny_fixture_state["refine_net.0.0.weight_orig"])


def test_old_head_cls_is_dropped_on_purpose(tiny_model, tiny_fixture_state):
    state = dict(tiny_fixture_state)
    state["encoder.arch.head_cls.weight"] = torch.zeros(4, 768)
    state["encoder.arch.head_cls.bias"] = torch.zeros(4)
    load_official(tiny_model, state)


def test_unexpected_missing_and_shape_errors_name_keys(tiny_model, tiny_fixture_state):
    state = dict(tiny_fixture_state)
    state["decoder.some_new_layer.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*decoder\.some_new_layer\.weight"):
        load_official(tiny_model, state)
    state = dict(tiny_fixture_state)
    del state["decoder.color_decoder.query_feat.weight"]
    with pytest.raises(CheckpointError, match=r"missing.*color_decoder\.query_feat\.weight"):
        load_official(tiny_model, state)
    state = dict(tiny_fixture_state)
    state["decoder.color_decoder.query_feat.weight"] = torch.zeros(256, 256)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*query_feat\.weight.*\(256, 256\)"):
        load_official(tiny_model, state)


@pytest.mark.slow
def test_large_manifest_loads_and_wrong_variant_is_rejected(manifest, tiny_model):
    state = random_state_dict(manifest["large"])
    assert len(state) == 602
    large = build_model("large", pretrained=None)
    load_official(large, {"params": state})
    assert torch.equal(large.encoder.backbone.stages_2.blocks[26].gamma, state["encoder.arch.stages.2.26.gamma"])
    assert sum(p.numel() for p in large.parameters()) == pytest.approx(227.9e6, rel=0.01)
    with pytest.raises(CheckpointError, match=r"looks like large \(convnext_large\).*shape mismatches"):
        load_official(tiny_model, {"params": state})


def test_checkpoint_files_pth_and_safetensors(tmp_path, tiny_model, tiny_fixture_state):
    pth = tmp_path / "ddcolor_paper_tiny.pth"
    torch.save({"params": tiny_fixture_state}, pth)
    sft = tmp_path / "official.safetensors"
    save_file(tiny_fixture_state, str(sft))
    for path in (pth, sft):
        load_official(tiny_model, path)
    model = load_model(pth)  # preset inferred from the checkpoint
    assert model.config.backbone == "convnext_tiny" and not model.training


def test_corrupt_truncated_and_non_state_dict_files(tmp_path, tiny_model, tiny_fixture_state):
    good = tmp_path / "good.pth"
    torch.save({"params": tiny_fixture_state}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: cannot read checkpoint"):
        load_official(tiny_model, truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pth: cannot read checkpoint"):
        load_official(tiny_model, garbage)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_official(tiny_model, empty)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_official(tiny_model, not_a_state_dict)
    wrong_values = tmp_path / "strings.pth"
    torch.save({"params": {"a": "b"}}, wrong_values)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_official(tiny_model, wrong_values)
    # an arbitrary pickled object is refused by weights_only loading instead of being executed
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(OFFICIAL_RELEASES.__class__))
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_official(tiny_model, evil)


def test_own_checkpoint_round_trip(tmp_path, atto_model):
    path = save_checkpoint(atto_model, tmp_path / "run" / "generator", extra={"step": 7})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    restored = load_model(path)
    gray = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(gray), atto_model.eval()(gray))
    path.with_suffix(".json").unlink()  # config embedded in the safetensors metadata is enough
    assert isinstance(load_model(path), DDColor)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


def test_unknown_model_reference_lists_choices():
    with pytest.raises(FileNotFoundError, match="ddcolor_paper_tiny"):
        load_model("no/such/file.pth")


def test_build_from_params_yaml_model_section():
    from ddcolor.config import load_config

    config = load_config("params.yaml", ["model.pretrained=null", "model.num_queries=20", "model.dec_layers=3"])
    model = build_model_from_config(config.model)
    assert model.config.backbone == "convnext_atto"
    assert model.color_decoder.query_feat.weight.shape[0] == 20 and model.color_decoder.num_layers == 3
