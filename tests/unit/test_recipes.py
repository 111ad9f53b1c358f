"""Named recipes (`ddcolor.recipes`, ddcolor/configs/*.yaml): each is a valid config layer, found from any working
directory, layered under the caller's overrides."""

from __future__ import annotations

import pytest

from ddcolor.config import ConfigError, load_config
from ddcolor.recipes import RECIPES, load_recipe, recipe_overrides, recipe_path, recipe_sections


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_valid_config_layer(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # package data: no dependence on the working directory
    assert recipe_path(name).is_file()
    cfg = load_recipe(name)
    for key, value in recipe_overrides(name).items():
        section, field = key.split(".", 1)
        got = getattr(getattr(cfg, section), field)
        assert got == (tuple(value) if isinstance(value, list) else value), key


def test_overrides_win_and_a_base_file_goes_under():
    cfg = load_recipe("tiny", ["train.max_steps=5"])
    assert cfg.train.max_steps == 5 and cfg.model.num_queries == 16 and cfg.eval.metric_weights == "random"
    assert load_recipe("tiny", {"train.max_steps": 7}).train.max_steps == 7
    assert load_recipe("finetune").train.lr == 1e-5 != load_config(None).train.lr


def test_sections_are_a_fresh_copy_and_unknown_names_say_which_exist():
    recipe_sections("tiny")["train"]["max_steps"] = 999
    assert recipe_sections("tiny")["train"]["max_steps"] == 2
    with pytest.raises(ConfigError, match="unknown recipe 'huge'; known: demo, finetune, tiny"):
        load_recipe("huge")
