"""One typed configuration for the whole platform.

`params.yaml` (sections ``data``, ``validate``, ``model``, ``train``, ``eval``, ``gates``, ``registry``) is loaded
into the frozen pydantic models below; the CLI, the Prefect flows and DVC all read the same file. The field defaults
here are the single source of truth and follow the official DDColor recipe
(https://github.com/piddnad/DDColor, ``options/train/train_ddcolor.yml``).

Endpoints and credentials never live in `params.yaml`: they come from the environment only
(see :class:`EnvSettings` and ``.env.example``).

Usage::

    cfg = load_config("params.yaml", overrides=["train.lr=3e-4", "model.preset=tiny"])
    cfg.train.lr            # 0.0003
    cfg.to_flat_dict()      # {"data.source": "data/raw", ..., "train.lr": 0.0003, ...}
    env = EnvSettings.from_env()    # endpoints and secrets from os.environ

Every mistake is a :class:`ConfigError` that names the source and the dotted key, e.g.
``params.yaml: train.lrr: unknown key (did you mean 'lr'?)``.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ddcolor.errors import DDColorError
from ddcolor.presets import INPUT_MULTIPLE, PRESETS

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EnvSettings",
    "EvalConfig",
    "GatesConfig",
    "ModelConfig",
    "RegistryConfig",
    "TrainConfig",
    "ValidateConfig",
    "load_config",
]

ResizeMode = Literal["resize", "center_crop"]
Metric = Literal["fid", "colorfulness", "delta_colorfulness", "psnr", "lpips"]
Scalar = str | int | float | bool | None


class ConfigError(DDColorError, ValueError):
    """A bad configuration. The message names the source (file or ``override``), the dotted key and why.

    Attributes:
        problems: One line per problem, each ``"<source>: <dotted.key>: <reason>"``.
    """

    def __init__(self, problems: str | Sequence[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _multiple_of_stride(value: int) -> int:
    if value % INPUT_MULTIPLE:
        raise ValueError(f"must be a multiple of {INPUT_MULTIPLE}")
    return value


#: A square image side in px that the ConvNeXt encoder can take (positive multiple of 32).
ImageSize = Annotated[int, Field(gt=0), AfterValidator(_multiple_of_stride)]


class _Section(BaseModel):
    """Base of every section: immutable, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# --- sections ------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Where raw images come from and how they become Parquet shards for training and validation."""

    source: str = Field("data/raw", min_length=1, description="Raw images: a local folder or an s3:// URI.")
    shards_uri: str = Field(
        "data/shards", min_length=1, description="Where the Parquet shards go: a local folder or an s3:// URI."
    )
    size: ImageSize = Field(256, description="Training resolution, px (square; multiple of 32).")
    resize_mode: ResizeMode = Field(
        "resize",
        description="'resize': direct resize to size×size (official recipe); "
        "'center_crop': short side to size, then center crop.",
    )
    hflip: bool = Field(True, description="Random horizontal flip while training (official recipe: on).")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of images held out for validation.")
    shard_rows: int = Field(1024, ge=1, description="Images (rows) per Parquet shard.")
    min_colorfulness: float = Field(
        15.0,
        ge=0.0,
        description="Hasler–Süsstrunk colorfulness below which an image is flagged and kept out of training "
        "(near-grayscale photos teach desaturation); 0 keeps all.",
    )
    max_image_pixels: int | None = Field(
        89_478_485,
        ge=1,
        description="Decompression-bomb guard: images with more pixels are rejected (PIL's default); null = off.",
    )
    num_workers: int = Field(4, ge=0, description="DataLoader / preprocessing worker processes.")
    seed: int = Field(0, ge=0, description="Seed for the train/val split and shuffling.")


class ModelConfig(_Section):
    """DDColor architecture: ConvNeXt encoder, pixel decoder, query-based multi-scale color decoder."""

    preset: str = Field("large", description="Encoder size: atto (CPU demo), tiny, or large (the paper's model).")
    backbone: str | None = Field(
        None,
        min_length=1,
        description="timm ConvNeXt-style backbone name (optionally '.tag') overriding the preset's; "
        "null = use the preset's.",
    )
    pretrained: Literal["imagenet"] | None = Field(
        "imagenet", description="Encoder initialization: 'imagenet' weights, or null for explicit random init."
    )
    num_queries: int = Field(100, ge=1, description="Color queries in the color decoder.")
    num_scales: int = Field(
        3, ge=3, le=3, description="Feature scales the color decoder attends to (the pixel decoder gives 3)."
    )
    dec_layers: int = Field(9, ge=1, description="Transformer layers in the color decoder.")
    nf: int = Field(512, ge=1, description="Channels of the pixel decoder's upsampling blocks.")
    hidden_dim: int = Field(256, ge=1, description="Color-decoder embedding width (divisible by nheads).")
    nheads: int = Field(8, ge=1, description="Attention heads in the color decoder.")
    dim_feedforward: int = Field(2048, ge=1, description="Color-decoder feed-forward width.")
    disc_nf: int = Field(64, ge=1, description="Base channels of the U-Net discriminator (training only).")
    input_size: ImageSize = Field(
        512, description="Inference resolution, px: the L channel is resized to this square (multiple of 32)."
    )

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {sorted(PRESETS)} (or set model.backbone)")
        return value

    @field_validator("nheads")
    @classmethod
    def _check_heads(cls, value: int, info: ValidationInfo) -> int:
        hidden_dim = info.data.get("hidden_dim")
        if hidden_dim is not None and hidden_dim % value:
            raise ValueError(f"must divide model.hidden_dim ({hidden_dim})")
        return value


#: Per-image columns whose quantiles the drift checks compare (``ddcolor.data.validate.DRIFT_COLUMNS``).
DriftColumn = Literal["L_mean", "L_std", "a_mean", "b_mean", "colorfulness"]


class ValidateConfig(_Section):
    """Tolerances of the dataset validation (`ddcolor validate`, the pipeline's validate step); the single source of
    truth for ``ddcolor.data.validate.Tolerances``. Part of the pipeline fingerprint."""

    split_abs: float = Field(
        0.02, ge=0.0, le=1.0, description="Allowed |val share − data.val_fraction| on top of the sampling allowance."
    )
    split_sigmas: float = Field(
        4.0,
        ge=0.0,
        description="Binomial standard deviations sqrt(f (1 − f) / n) added to split_abs (small datasets deviate).",
    )
    max_low_colorfulness_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Largest allowed share of rows flagged low_colorfulness (near-gray photos)."
    )
    ab_range: dict[Literal["a", "b"], tuple[float, float]] = Field(
        default_factory=lambda: {"a": (-87.0, 99.0), "b": (-109.0, 95.0)},
        description="Allowed per-pixel a* and b* range, Lab units ([lo, hi] each). The sRGB gamut (D65) spans "
        "a in [-86.2, 98.2], b in [-107.9, 94.5]; one unit of slack for rounding.",
    )
    colorfulness_eps: float = Field(
        1e-3, ge=0.0, description="Rows this close to data.min_colorfulness may carry either flag (float32 rounding)."
    )
    drift_quantiles: tuple[float, ...] = Field(
        (0.1, 0.5, 0.9), min_length=1, description="Quantiles compared against the reference dataset, each in [0, 1]."
    )
    drift_abs: dict[DriftColumn, float] = Field(
        default_factory=lambda: {"L_mean": 5.0, "L_std": 4.0, "a_mean": 3.0, "b_mean": 4.0, "colorfulness": 8.0},
        description="Absolute drift tolerance per column around the reference quantile, in the column's units "
        "(L*, a*, b*, colorfulness); columns left out keep their default.",
    )

    @field_validator("ab_range")
    @classmethod
    def _check_ab_range(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for channel, (lo, hi) in value.items():
            if lo >= hi:
                raise ValueError(f"{channel}: low end must be below high end")
        return {"a": (-87.0, 99.0), "b": (-109.0, 95.0), **value}

    @field_validator("drift_quantiles")
    @classmethod
    def _check_quantiles(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0.0 <= q <= 1.0 for q in value):
            raise ValueError("each quantile must be in [0, 1]")
        return value

    @field_validator("drift_abs")
    @classmethod
    def _check_drift(cls, value: dict[str, float]) -> dict[str, float]:
        if any(v < 0 for v in value.values()):
            raise ValueError("tolerances must be >= 0")
        defaults = {"L_mean": 5.0, "L_std": 4.0, "a_mean": 3.0, "b_mean": 4.0, "colorfulness": 8.0}
        return {**defaults, **value}


class TrainConfig(_Section):
    """GAN training: AdamW generator, Adam discriminator, multi-step LR decay, DDColor's four losses."""

    batch_size: int = Field(
        16,
        ge=1,
        description="Effective batch per optimizer step, images, summed over processes and accumulation steps "
        "(official: 4 GPUs × 4).",
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-4, gt=0.0, description="Generator AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.99), description="Generator AdamW betas, each in [0, 1).")
    weight_decay: float = Field(0.01, ge=0.0, description="Generator AdamW weight decay.")
    lr_d: float = Field(1e-4, gt=0.0, description="Discriminator Adam learning rate.")
    betas_d: tuple[float, float] = Field((0.9, 0.99), description="Discriminator Adam betas, each in [0, 1).")
    weight_decay_d: float = Field(0.0, ge=0.0, description="Discriminator weight decay.")
    milestones: tuple[int, ...] = Field(
        (80_000, 120_000, 160_000, 200_000, 240_000, 280_000, 320_000, 360_000),
        description="Steps at which both learning rates are multiplied by gamma (strictly increasing).",
    )
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="Multiplicative LR decay at each milestone.")
    max_steps: int = Field(400_000, ge=1, description="Optimizer steps to train for.")
    loss_pixel: float = Field(0.1, ge=0.0, description="Weight of the L1 loss on the predicted ab channels.")
    loss_perceptual: float = Field(5.0, ge=0.0, description="Weight of the VGG16-BN perceptual loss.")
    loss_gan: float = Field(1.0, ge=0.0, description="Weight of the (vanilla) adversarial loss.")
    loss_colorfulness: float = Field(0.5, ge=0.0, description="Weight of the colorfulness loss.")
    use_colorfulness_loss: bool = Field(True, description="Add the colorfulness loss at all.")
    color_enhance_factor: float = Field(
        1.2, ge=1.0, description="Saturation boost of the ground truth's ab channels while training; 1 = off."
    )
    grad_clip_norm: float | None = Field(None, gt=0.0, description="Clip gradients to this global L2 norm; null = off.")
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="Keep an EMA of generator weights with this decay; null = off."
    )
    amp: Literal["auto", "none", "bf16", "fp16"] = Field(
        "auto",
        description="Mixed precision: auto (bf16 where the GPU/CPU has native bf16, else fp32; see ddcolor.precision), "
        "none (fp32), bf16 or fp16.",
    )
    channels_last: bool = Field(False, description="Use channels-last memory format (faster convs on GPUs).")
    compile: bool = Field(False, description="torch.compile the generator.")
    seed: int = Field(0, ge=0, description="Seed for weights init and training randomness.")
    checkpoint_every: int = Field(10_000, ge=1, description="Save a checkpoint every this many steps.")
    checkpoint_dir: str = Field("checkpoints", min_length=1, description="Folder for training checkpoints.")
    keep_last: int | None = Field(
        3,
        ge=2,
        description="Training checkpoints kept (newest); at least 2, so that a damaged newest one has an intact "
        "fallback for --resume; null = keep all.",
    )
    log_every: int = Field(100, ge=1, description="Log losses every this many steps.")
    device: str = Field("auto", description="'auto' (CUDA, then MPS, then CPU), 'cpu', 'mps', 'cuda' or 'cuda:N'.")

    @field_validator("betas", "betas_d")
    @classmethod
    def _check_betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("each beta must be in [0, 1)")
        return value

    @field_validator("milestones")
    @classmethod
    def _check_milestones(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(m < 1 for m in value) or any(a >= b for a, b in itertools.pairwise(value)):
            raise ValueError("must be positive and strictly increasing")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'")
        return value

    @field_validator("grad_accum_steps")
    @classmethod
    def _check_accum(cls, value: int, info: ValidationInfo) -> int:
        batch_size = info.data.get("batch_size")
        if batch_size is not None and batch_size % value:
            raise ValueError(f"must divide train.batch_size ({batch_size})")
        return value


class EvalConfig(_Section):
    """Offline evaluation of a model on held-out images."""

    image_size: ImageSize = Field(256, description="Evaluation resolution, px (square; multiple of 32).")
    resize_mode: ResizeMode = Field(
        "resize", description="'resize': direct resize; 'center_crop': short side to image_size, then center crop."
    )
    batch_size: int = Field(8, ge=1, description="Images per forward pass.")
    max_images: int | None = Field(None, ge=1, description="Evaluate at most this many images; null = all.")
    metrics: tuple[Metric, ...] = Field(
        ("fid", "colorfulness", "delta_colorfulness", "psnr", "lpips"),
        min_length=1,
        description="Metrics to compute: fid (lower is better), colorfulness (higher), delta_colorfulness "
        "(|CF(pred) − CF(gt)|, lower), psnr (dB, higher), lpips (lower).",
    )
    fid_weights: str = Field(
        "pt_inception-2015-12-05",
        min_length=1,
        description="Inception weights for FID (pytorch-fid's port of the TF 2015-12-05 graph).",
    )

    metric_weights: Literal["cache", "random"] = Field(
        "cache",
        description="Weights of the metric networks (Inception for FID, AlexNet for LPIPS): 'cache' = the pretrained "
        "files from the weights cache (fails with instructions when missing); 'random' = random init, for smoke "
        "tests and offline demos only: FID and LPIPS values are then MEANINGLESS (a warning says so).",
    )

    @field_validator("metrics")
    @classmethod
    def _check_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("must not repeat a metric")
        return value


class GatesConfig(_Section):
    """Promotion gates a challenger must pass to become champion. Every gate is off when null."""

    max_fid: float | None = Field(None, ge=0.0, description="Absolute gate: FID must be at most this.")
    min_colorfulness: float | None = Field(None, ge=0.0, description="Absolute gate: colorfulness at least this.")
    max_delta_colorfulness: float | None = Field(
        None, ge=0.0, description="Absolute gate: |CF(pred) − CF(gt)| at most this."
    )
    min_psnr: float | None = Field(None, description="Absolute gate: PSNR at least this, dB.")
    fid_margin_vs_champion: float | None = Field(
        0.5, description="Challenger FID must be ≤ champion FID + this margin (negative demands improvement)."
    )
    colorfulness_margin_vs_champion: float | None = Field(
        2.0, description="Challenger colorfulness must be ≥ champion colorfulness − this margin."
    )
    psnr_margin_vs_champion: float | None = Field(
        None, description="Challenger PSNR must be ≥ champion PSNR − this margin, dB (paired on the same images)."
    )
    lpips_margin_vs_champion: float | None = Field(
        None, description="Challenger LPIPS must be ≤ champion LPIPS + this margin (paired on the same images)."
    )
    require_interval: bool = Field(
        False,
        description="Per-image *_margin_vs_champion checks (colorfulness, psnr, lpips) pass only when the whole "
        "bootstrap 95% interval of the paired challenger − champion delta clears the margin, not just its mean.",
    )
    min_fid_images: int = Field(
        2048,
        ge=1,
        description="FID checks need at least this many images (FID on fewer than its 2048 feature dimensions is "
        "dominated by bias); below it they fail unless allow_small_fid_sample.",
    )
    allow_small_fid_sample: bool = Field(
        False,
        description="Gate on FID measured on fewer than min_fid_images images anyway (demos and smoke tests; the "
        "check's reason says so).",
    )
    require_approval: bool = Field(
        False,
        description="A challenger whose gates pass waits (as @challenger) for a person to approve it before it moves "
        "@champion: the Prefect flow pauses for typed input, answered in the Prefect UI or with `ddcolor approve`.",
    )
    approval_timeout_hours: float = Field(
        24.0, gt=0.0, description="Without an answer within this many hours the run ends 'not promoted'."
    )

    def required_metrics(self) -> set[str]:
        """Names of the eval metrics the enabled gates need."""
        needs = {
            "max_fid": "fid",
            "fid_margin_vs_champion": "fid",
            "min_colorfulness": "colorfulness",
            "colorfulness_margin_vs_champion": "colorfulness",
            "max_delta_colorfulness": "delta_colorfulness",
            "min_psnr": "psnr",
            "psnr_margin_vs_champion": "psnr",
            "lpips_margin_vs_champion": "lpips",
        }
        return {metric for field, metric in needs.items() if getattr(self, field) is not None}


class RegistryConfig(_Section):
    """MLflow experiment and model-registry names (the tracking URI comes from the environment)."""

    model_name: str = Field("ddcolor", min_length=1, description="Registered model name.")
    champion_alias: str = Field("champion", description="Alias of the version that serves.")
    challenger_alias: str = Field("challenger", description="Alias of the version under evaluation.")
    experiment_name: str = Field("ddcolor", min_length=1, description="MLflow experiment for training runs.")
    export_onnx: bool = Field(
        True,
        description="Export every registered version to ONNX and attach it (version tag onnx_artifact); about 35 s "
        "of CPU time for atto on the build machine. Off: `ddcolor export-onnx --model models:/NAME@ALIAS` when needed.",
    )

    @field_validator("champion_alias", "challenger_alias")
    @classmethod
    def _check_alias(cls, value: str) -> str:
        # MLflow's rules: letters, digits, '_' and '-'; 'latest' and 'v<N>' are reserved.
        if not re.fullmatch(r"[A-Za-z0-9_-]+", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError("must be letters, digits, '_' or '-', and not 'latest' or 'v<N>'")
        return value

    @field_validator("challenger_alias")
    @classmethod
    def _check_distinct(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("champion_alias"):
            raise ValueError("must differ from registry.champion_alias")
        return value


# --- root ----------------------------------------------------------------------------------------------


warnings.filterwarnings("ignore", message='Field name "validate" in "Config" shadows', category=UserWarning)


class Config(_Section):
    """The whole configuration: one field per `params.yaml` section."""

    data: DataConfig = Field(default_factory=DataConfig, description="Raw images and Parquet shards.")
    # shadows the deprecated classmethod BaseModel.validate (pydantic v1 API, unused here): the section is `validate`
    validate: ValidateConfig = Field(default_factory=ValidateConfig, description="Dataset validation tolerances.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="DDColor architecture.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training recipe.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Offline evaluation.")
    gates: GatesConfig = Field(default_factory=GatesConfig, description="Promotion gates.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow names.")

    def to_flat_dict(self) -> dict[str, Scalar]:
        """Flatten to ``{"section.key": value}`` (for MLflow params). Lists and mappings become JSON strings."""
        flat: dict[str, Scalar] = {}
        for section, values in self.model_dump(mode="json").items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, list | dict) else value
        return flat

    def to_yaml(self) -> str:
        """The configuration as `params.yaml`-style YAML (no comments); `load_config` reads it back."""
        return yaml.dump(self.model_dump(mode="json"), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> Config:
        """A new, validated config with dotted overrides applied (see `load_config`)."""
        return _build(self.model_dump(mode="json"), overrides, source="config")


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists (``betas: [0.9, 0.99]``), like `params.yaml`."""


_Dumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


# --- loading -------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """Safe YAML loader that reads ``1e-4`` as a float (YAML 1.2, as DVC does) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_config(path: str | Path | None = "params.yaml", overrides: Sequence[str] | Mapping[str, Any] = ()) -> Config:
    """Load, override and validate the configuration.

    Args:
        path: YAML file with any of the sections. None means defaults only; a path that does not exist is
            an error.
        overrides: Dotted ``key=value`` strings, e.g. ``"train.lr=3e-4"``, ``"model.pretrained=null"``,
            ``"train.betas=[0.9, 0.999]"``; values are parsed as YAML. A mapping ``{"train.lr": 3e-4}`` is
            taken as-is. Overrides win over the file.

    Returns:
        The validated, frozen `Config`.

    Raises:
        ConfigError: naming the file (or ``override``), the dotted key and the reason, for a missing file,
            bad YAML, an unknown key (with a suggestion) or a bad value.
    """
    if path is None:
        return _build({}, overrides, source="defaults")
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"{source}: no such file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{source}: {where}invalid YAML: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {_show(data)}")
    return _build(data, overrides, source=source)


def _build(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any], source: str) -> Config:
    data = copy.deepcopy(data)
    overridden = _apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = _dotted(e["loc"])
            origin = "override" if any(_within(key, o) for o in overridden) else source
            problems.append(f"{origin}: {key}: {_reason(e)}")
        raise ConfigError(problems) from None


def _apply_overrides(data: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Write dotted overrides into `data` in place; return the dotted keys written."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"override: {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
            items.append((key, _parse_scalar(raw)))
    written = []
    for key, value in items:
        parts = key.strip().split(".")
        _check_key(parts)
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        written.append(".".join(parts))
    return written


def _parse_scalar(raw: str) -> Any:
    """Parse an override value as YAML (``3e-4`` -> float, ``null`` -> None, ``[1, 2]`` -> list)."""
    if not raw.strip():
        return raw
    try:
        return yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError:
        return raw


def _check_key(parts: list[str]) -> None:
    """Raise if a dotted override key does not name a section or field."""
    model: type[BaseModel] | None = Config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if model is None:
            raise ConfigError(f"override: {'.'.join(parts)}: {prefix} is not a section")
        if part not in model.model_fields:
            raise ConfigError(f"override: {'.'.join(parts)}: {_unknown(part, model)}")
        model = _section_model(model, part)


def _section_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    annotation = model.model_fields[field].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _section_model(model, part)
    return model


def _unknown(key: str, model: type[BaseModel] | None) -> str:
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (known: {', '.join(known)})"


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _within(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


_EXPECTED = {
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
}


def _reason(error: Mapping[str, Any]) -> str:
    """One readable reason for one pydantic error, ending with the offending value."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown(str(error["loc"][-1]), _model_at(error["loc"][:-1]))
    if kind in _EXPECTED:
        reason = _EXPECTED[kind]
    elif kind == "literal_error":
        reason = f"expected one of {ctx.get('expected', '')}"
    elif kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        reason = f"expected {'at least' if kind == 'too_short' else 'at most'} {bound} items"
    elif kind == "missing":
        reason = "missing item" if isinstance(error["loc"][-1], int) else "missing"
    elif kind in ("value_error", "assertion_error"):
        reason = str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    else:
        reason = str(error["msg"]).replace("Input should be", "must be")
    return f"{reason}, got {_show(error.get('input'))}"


def _show(value: Any) -> str:
    """A short, YAML-flavoured rendering of a bad value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        text = json.dumps(list(value), default=str)
        return text if len(text) <= 60 else "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- environment ---------------------------------------------------------------------------------------


def _default_weights_dir() -> Path:
    """torch.hub's checkpoint folder, ``$TORCH_HOME/hub/checkpoints``, without importing torch."""
    torch = sys.modules.get("torch")
    if torch is not None:  # respects torch.hub.set_dir() if torch is already loaded
        return Path(torch.hub.get_dir()) / "checkpoints"
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))
    return Path(torch_home) / "hub" / "checkpoints"


class EnvSettings(BaseModel):
    """Endpoints and credentials, from environment variables only (documented in ``.env.example``).

    Each field reads the variable named by its alias; an empty variable counts as unset. Build it with
    `EnvSettings.from_env()`; nothing is read at import time.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True)

    mlflow_tracking_uri: str = Field(
        "sqlite:///mlflow.db",
        alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking server or store; default: SQLite file in the working directory.",
    )
    aws_endpoint_url: str | None = Field(
        None, alias="AWS_ENDPOINT_URL", description="S3 endpoint (MinIO, moto); null = AWS."
    )
    aws_access_key_id: SecretStr | None = Field(None, alias="AWS_ACCESS_KEY_ID", description="S3 access key id.")
    aws_secret_access_key: SecretStr | None = Field(
        None, alias="AWS_SECRET_ACCESS_KEY", description="S3 secret access key."
    )
    aws_default_region: str | None = Field(None, alias="AWS_DEFAULT_REGION", description="S3 region.")
    prefect_api_url: str | None = Field(
        None, alias="PREFECT_API_URL", description="Prefect server API; null = an ephemeral local server."
    )
    weights_dir: Path = Field(
        default_factory=_default_weights_dir,
        alias="DDCOLOR_WEIGHTS_DIR",
        description="Local cache of pretrained weights; default: torch.hub's checkpoints folder.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EnvSettings:
        """Read the settings from `environ` (default: ``os.environ``)."""
        environ = os.environ if environ is None else environ
        names = [field.alias or name for name, field in cls.model_fields.items()]
        return cls.model_validate({n: environ[n] for n in names if environ.get(n, "").strip()})

    def s3_client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("s3", **kwargs)``; unset values are left out."""
        kwargs = {
            "endpoint_url": self.aws_endpoint_url,
            "aws_access_key_id": self.aws_access_key_id and self.aws_access_key_id.get_secret_value(),
            "aws_secret_access_key": self.aws_secret_access_key and self.aws_secret_access_key.get_secret_value(),
            "region_name": self.aws_default_region,
        }
        return {k: v for k, v in kwargs.items() if v}
