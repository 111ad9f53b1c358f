"""Tests for ddcolor.config: loading, overrides, validation messages, flattening and env settings."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from ddcolor.config import (
    Config,
    ConfigError,
    EnvSettings,
    ModelConfig,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ROOT / "params.yaml"

# The repo's params.yaml is the CPU demo; everything else is the official recipe (= Config() defaults).
DEMO_DIFFERENCES = {"model.preset": "atto", "train.batch_size": 4, "train.max_steps": 200}


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_validate_and_follow_official_recipe():
    cfg = Config()
    assert cfg.model.preset == "large" and cfg.model.backbone is None
    assert cfg.train.lr == 1e-4 and cfg.train.betas == (0.9, 0.99) and cfg.train.max_steps == 400_000
    assert cfg.train.milestones[0] == 80_000 and cfg.train.milestones[-1] == 360_000
    assert Config.model_validate(cfg.model_dump()) == cfg
    assert load_config(None) == cfg


def test_params_yaml_differs_from_defaults_only_for_the_cpu_demo():
    flat, defaults = load_config(PARAMS).to_flat_dict(), Config().to_flat_dict()
    assert flat.keys() == defaults.keys()  # every field is written out
    assert {k: v for k, v in flat.items() if v != defaults[k]} == DEMO_DIFFERENCES


def test_params_yaml_writes_every_key():
    raw = yaml.safe_load(PARAMS.read_text())
    for section, model in Config.model_fields.items():
        assert set(raw[section]) == set(model.annotation.model_fields), section


def test_params_yaml_reads_the_same_in_dvc_yaml_parser():
    ruamel = pytest.importorskip("ruamel.yaml")
    raw = ruamel.YAML(typ="safe", pure=True).load(PARAMS.read_text())
    assert Config.model_validate(raw) == load_config(PARAMS)


def test_unknown_key_names_dotted_key_and_suggests(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.lrr: unknown key (did you mean 'lr'?)"


def test_unknown_section_names_key_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: train.lr: expected a number, got 'fast'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data:\n  source: 5\n", "data.source: expected a string, got 5"),
        ("data:\n  shard_rows: many\n", "data.shard_rows: expected an integer, got 'many'"),
        ("train:\n  compile: maybe\n", "train.compile: expected true or false, got 'maybe'"),
        (
            "model:\n  preset: huge\n",
            "model.preset: unknown preset 'huge'; choose one of ['atto', 'large', 'tiny'] (or set model.backbone), "
            "got 'huge'",
        ),
        ("train: 3\n", "train: expected a mapping, got 3"),
        ("train:\n  betas: [0.9, x]\n", "train.betas[1]: expected a number, got 'x'"),
    ],
)
def test_type_errors_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {expected}"


def test_all_problems_are_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "train:\n  lr: fast\n  lrr: 1\ndata:\n  size: 250\n"))
    keys = {p.split(": ")[1] for p in err.value.problems}
    assert keys == {"train.lr", "train.lrr", "data.size"}


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    [
        ("data.size=250", "data.size", "multiple of 32"),
        ("model.input_size=500", "model.input_size", "multiple of 32"),
        ("eval.image_size=0", "eval.image_size", "greater than 0"),
        ("train.lr=-1e-4", "train.lr", "greater than 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
        ("train.betas=[0.9, 1.2]", "train.betas", "[0, 1)"),
        ("train.betas=[0.9]", "train.betas[1]", "missing"),
        ("train.milestones=[200, 100]", "train.milestones", "strictly increasing"),
        ("train.grad_accum_steps=3", "train.grad_accum_steps", "must divide train.batch_size"),
        ("model.nheads=7", "model.nheads", "must divide model.hidden_dim"),
        ("train.amp=fp8", "train.amp", "expected one of"),
        ("train.device=gpu", "train.device", "cuda:N"),
        ("eval.metrics=[fid, fid]", "eval.metrics", "repeat"),
        ("eval.metrics=[fid, ssim]", "eval.metrics[1]", "expected one of"),
        ("registry.challenger_alias=champion", "registry.challenger_alias", "differ"),
        ("registry.champion_alias=latest", "registry.champion_alias", "latest"),
        ("registry.export_onnx=maybe", "registry.export_onnx", "true or false"),
    ],
)
def test_invalid_values_name_the_key(override, key, reason):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(f"override: {key}: ")
    assert reason in str(err.value)


def test_overrides_apply_and_win_over_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  max_steps: 10\nmodel:\n  preset: tiny\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.pretrained=null", "data.source=s3://bucket/raw"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 10  # from the file
    assert cfg.model.preset == "tiny"
    assert cfg.model.pretrained is None
    assert cfg.data.source == "s3://bucket/raw"


def test_override_value_types_parse_as_yaml():
    cfg = load_config(
        None,
        [
            "train.betas=[0.5, 0.999]",
            "train.milestones=[10, 20]",
            "train.max_steps=4e5",
            "train.compile=true",
            "eval.metrics=[psnr]",
            "gates.max_fid=null",
            "train.grad_clip_norm=1.0",
        ],
    )
    assert cfg.train.betas == (0.5, 0.999)
    assert cfg.train.milestones == (10, 20)
    assert cfg.train.max_steps == 400_000
    assert cfg.train.compile is True
    assert cfg.eval.metrics == ("psnr",)
    assert cfg.train.grad_clip_norm == 1.0


def test_mapping_overrides_are_taken_as_is():
    cfg = load_config(None, {"train.lr": 2e-4, "model.backbone": "convnext_small.fb_in22k"})
    assert cfg.train.lr == 2e-4
    assert cfg.model.backbone == "convnext_small.fb_in22k"


def test_unknown_override_key_errors_with_suggestion():
    with pytest.raises(ConfigError, match=r"^override: train\.lrr: unknown key \(did you mean 'lr'\?\)$"):
        load_config(None, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"train\.lr\.x: train\.lr is not a section"):
        load_config(None, ["train.lr.x=1"])


def test_malformed_override_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.lr"])


def test_bad_override_value_is_blamed_on_override_not_file():
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, ["train.lr=fast"])
    assert str(err.value) == "override: train.lr: expected a number, got 'fast'"


def test_with_overrides_returns_a_new_validated_config():
    cfg = Config()
    tiny = cfg.with_overrides(["model.preset=tiny"])
    assert tiny.model.preset == "tiny" and cfg.model.preset == "large"
    with pytest.raises(ConfigError):
        cfg.with_overrides(["model.preset=huge"])


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_to_flat_dict_has_dotted_scalar_values():
    flat = Config().to_flat_dict()
    assert flat["train.lr"] == 1e-4
    assert flat["model.preset"] == "large"
    assert flat["train.betas"] == "[0.9, 0.99]"
    assert all(k.count(".") == 1 and k.split(".")[0] in Config.model_fields for k in flat)
    assert all(v is None or isinstance(v, str | int | float | bool) for v in flat.values())
    # Lists round-trip as override values.
    assert load_config(None, [f"train.betas={flat['train.betas']}"]).train.betas == (0.9, 0.99)


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "train.lr=3e-4", "gates.max_fid=10"])
    assert load_config(write(tmp_path, cfg.to_yaml())) == cfg


def test_yaml_float_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 3e-4\n"))
    assert cfg.train.lr == pytest.approx(3e-4)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_duplicate_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: line \d+: invalid YAML"):
        load_config(path)


def test_missing_explicit_file_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: no such file$"):
        load_config(missing)


def test_model_preset_must_be_known():
    assert ModelConfig(preset="atto").preset == "atto"
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig(preset="huge")


def test_gates_required_metrics():
    assert Config().gates.required_metrics() == {"fid", "colorfulness"}
    gates = load_config(None, ["gates.min_psnr=20", "gates.fid_margin_vs_champion=null"]).gates
    assert gates.required_metrics() == {"colorfulness", "psnr"}


# --- environment ---------------------------------------------------------------------------------------

ENV_VARS = [
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "PREFECT_API_URL",
    "DDCOLOR_WEIGHTS_DIR",
]


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*ENV_VARS, "TORCH_HOME", "XDG_CACHE_HOME"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_env_defaults(clean_env, tmp_path):
    clean_env.setenv("TORCH_HOME", str(tmp_path / "torch"))
    env = EnvSettings.from_env()
    assert env.mlflow_tracking_uri == "sqlite:///mlflow.db"
    assert env.aws_endpoint_url is None and env.aws_secret_access_key is None and env.prefect_api_url is None
    if "torch" not in sys.modules:  # else torch.hub.get_dir() decides
        assert env.weights_dir == tmp_path / "torch" / "hub" / "checkpoints"
    assert env.s3_client_kwargs() == {}


def test_env_reads_environment_and_hides_secrets(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    clean_env.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    clean_env.setenv("AWS_ACCESS_KEY_ID", "key-id-123")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-456")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    clean_env.setenv("PREFECT_API_URL", "http://prefect:4200/api")
    clean_env.setenv("DDCOLOR_WEIGHTS_DIR", str(tmp_path / "weights"))
    clean_env.setenv("UNRELATED", "x")
    env = EnvSettings.from_env()
    assert env.mlflow_tracking_uri == "http://mlflow:5000"
    assert env.prefect_api_url == "http://prefect:4200/api"
    assert env.weights_dir == tmp_path / "weights"
    assert env.aws_secret_access_key is not None
    assert env.aws_secret_access_key.get_secret_value() == "very-secret-456"
    for text in (repr(env), str(env), env.model_dump_json()):
        assert "very-secret-456" not in text and "key-id-123" not in text
    assert env.s3_client_kwargs() == {
        "endpoint_url": "http://minio:9000",
        "aws_access_key_id": "key-id-123",
        "aws_secret_access_key": "very-secret-456",
        "region_name": "eu-west-1",
    }


def test_env_empty_variable_counts_as_unset(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "")
    assert EnvSettings.from_env().mlflow_tracking_uri == "sqlite:///mlflow.db"


def test_env_from_explicit_mapping_ignores_os_environ(clean_env):
    clean_env.setenv("AWS_ENDPOINT_URL", "http://from-os:9000")
    env = EnvSettings.from_env({"AWS_ENDPOINT_URL": "http://given:9000"})
    assert env.aws_endpoint_url == "http://given:9000"


def test_env_example_documents_every_variable():
    text = (ROOT / ".env.example").read_text()
    for name in [*ENV_VARS, "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"]:
        assert name in text, name
    aliases = {field.alias for field in EnvSettings.model_fields.values()}
    assert aliases == set(ENV_VARS)


def test_validate_section_carries_the_tolerances_and_names_bad_keys():
    cfg = load_config(None, {"validate.max_low_colorfulness_share": 0.35, "validate.drift_abs": {"L_mean": 2.0}})
    assert cfg.validate.max_low_colorfulness_share == 0.35
    assert cfg.validate.drift_abs["L_mean"] == 2.0 and cfg.validate.drift_abs["colorfulness"] == 8.0  # merged
    assert cfg.to_flat_dict()["validate.ab_range"] == '{"a": [-87.0, 99.0], "b": [-109.0, 95.0]}'
    for override, key in (
        ("validate.split_abs=-1", "validate.split_abs"),
        ("validate.drift_abs={L_avg: 1}", "validate.drift_abs.L_avg"),
        ("validate.ab_range={a: [9, 1]}", "validate.ab_range"),
        ("validate.drift_quantiles=[0.5, 2]", "validate.drift_quantiles"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
