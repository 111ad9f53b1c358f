"""Named recipes: small config layers shipped with the package in ``ddcolor/configs/<name>.yaml``.

* ``finetune``: the ``ddcolor finetune`` defaults (train schedule; the GPU/CPU batch layout stays in the CLI);
* ``demo``: the static part of the ``ddcolor demo`` recipe (`ddcolor.demo` adds folders, steps and switches that
  depend on the weights cache);
* ``tiny``: the tests' and benches' tiny model and schedule (a whole pipeline run in seconds; meaningless metrics).

A recipe has the sections of params.yaml and holds only the keys it changes. `load_recipe` puts it on top of a base
file (or the built-in defaults) and under the caller's overrides, so ``load_recipe("tiny", ["train.max_steps=5"])``
is the tiny recipe with 5 steps. Being package data, the recipes do not depend on the working directory.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ddcolor.config import ConfigError

if TYPE_CHECKING:
    from ddcolor.config import Config

__all__ = ["RECIPES", "load_recipe", "recipe_overrides", "recipe_path", "recipe_sections"]

RECIPES = ("demo", "finetune", "tiny")


def recipe_path(name: str) -> Path:
    """The YAML file of recipe `name` (inside the installed package)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)} (ddcolor/configs/<name>.yaml)")
    return Path(str(resources.files("ddcolor") / "configs" / f"{name}.yaml"))


@functools.cache
def _read(name: str) -> dict[str, dict[str, Any]]:
    path = recipe_path(name)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: a recipe maps params.yaml sections to their keys")
    return data


def recipe_sections(name: str) -> dict[str, dict[str, Any]]:
    """Recipe `name` as sections, ``{"train": {"max_steps": 2, ...}, ...}`` (a fresh copy: change it freely)."""
    return copy.deepcopy(_read(name))


def recipe_overrides(name: str) -> dict[str, Any]:
    """Recipe `name` as dotted overrides, ``{"train.max_steps": 2, ...}`` (for `ddcolor.config.load_config`)."""
    return {f"{section}.{key}": value for section, values in _read(name).items() for key, value in values.items()}


def load_recipe(
    name: str,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    base: str | Path | None = None,
) -> Config:
    """The validated `Config`: `base` (a params.yaml; None = built-in defaults), then recipe `name`, then
    `overrides` (dotted ``key=value`` strings or a ``{"train.lr": 1e-4}`` mapping; they win).

    Raises:
        ConfigError: unknown recipe, or a bad key or value (naming it).
    """
    from ddcolor.config import load_config

    layered: dict[str, Any] = recipe_overrides(name)
    if isinstance(overrides, Mapping):
        layered.update(overrides)
        return load_config(base, layered)
    # JSON is YAML: each recipe value goes through load_config's YAML parsing unchanged
    return load_config(base, [*(f"{key}={json.dumps(value)}" for key, value in layered.items()), *overrides])
