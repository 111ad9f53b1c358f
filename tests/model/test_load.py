"""The one generator loader (`ddcolor.model.load.load_generator`) and the one device choice (`ddcolor.devices`)."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

from ddcolor.devices import resolve_device
from ddcolor.model.checkpoint import save_checkpoint
from ddcolor.model.load import load_generator, parse_random_init, random_init_generator


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_init_spec_is_seeded_and_in_eval_mode(caplog):
    model = load_generator("random-init:atto:3")
    assert not model.training and model.config.backbone.startswith("convnext_atto")
    assert _same_weights(model, random_init_generator("atto", seed=3, warn=False))
    assert not _same_weights(model, load_generator("random-init:atto:4"))
    assert "MEANINGLESS" in caplog.text  # a random model never loads silently


@pytest.mark.parametrize("spec", ["random-init:nano:0", "random-init:atto:x", "random-init:atto:0:1", "atto:0"])
def test_a_bad_random_init_spec_says_what_is_expected(spec):
    with pytest.raises(ValueError, match="expected random-init:PRESET:SEED"):
        parse_random_init(spec)


def test_a_checkpoint_file_loads_to_the_same_weights(tmp_path):
    model = random_init_generator("atto", seed=1, warn=False)
    path = save_checkpoint(model, tmp_path / "g")
    loaded = load_generator(path, device="cpu")
    assert _same_weights(model, loaded) and not loaded.training
    assert next(loaded.parameters()).device == torch.device("cpu")


def test_a_missing_file_lists_what_a_spec_may_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="official release"):
        load_generator(tmp_path / "nope.safetensors")


def test_colorize_no_longer_reaches_the_registry():
    """Loading a ``models:/`` URI is the loader's job (a lazy import there), not colorize's: no import of
    ddcolor.registry anywhere in ddcolor.colorize, function-local ones included."""
    import ddcolor.colorize

    tree = ast.parse(inspect.getsource(ddcolor.colorize))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "ddcolor.model.load" in imported and "ddcolor.registry" not in imported


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_what_to_use():
    with pytest.raises(ValueError, match="CUDA is not available here; use cpu"):
        resolve_device("cuda", local_rank=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_under_ddp_a_bare_cuda_takes_the_local_rank():
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")
    assert resolve_device("cuda:0", local_rank=3) == torch.device("cuda:0")
