"""Small-config recipes for tests: the packaged ``tiny`` pipeline recipe and the tiny trainer overrides.

params = tiny_recipe(data={"shard_rows": 4})      # params.yaml sections (flow / deployment parameters)
cfg = load_config(None, dotted(params))           # the same as dotted overrides
cfg = tiny_train_config("train.max_steps=2")      # the trainer tests' tiny atto on 64 px
"""

from __future__ import annotations

from ddcolor.config import load_config
from ddcolor.recipes import recipe_sections

#: A whole pipeline run in seconds on 2 CPU cores, shared by the pipeline, flow, DVC and deployment tests: the
#: packaged ``tiny`` recipe (ddcolor/configs/tiny.yaml: random-init atto with a small decoder, 64 px, 2 steps, metrics
#: without Inception/AlexNet), also what bench/orchestration.py runs.
TINY_RECIPE: dict[str, dict] = recipe_sections("tiny")


def tiny_recipe(**changes: dict) -> dict[str, dict]:
    """`TINY_RECIPE` with ``section={key: value}`` changes merged in (a new dict; the constant is not touched)."""
    merged = {section: dict(values) for section, values in TINY_RECIPE.items()}
    for section, values in changes.items():
        merged.setdefault(section, {}).update(values)
    return merged


def dotted(sections: dict[str, dict]) -> dict[str, object]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (overrides for `ddcolor.config.load_config`)."""
    return {f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()}


#: Sample images a tiny pipeline run ingests (the pipeline and flow tests).
TINY_IMAGES = 8

#: The trainer tests' tiny model as dotted overrides: random-init atto (8 queries, 3 decoder layers) on 64 px, CPU.
TINY_TRAIN = [
    "model.preset=atto",
    "model.pretrained=null",
    "model.num_queries=8",
    "model.dec_layers=3",
    "model.nf=64",
    "model.hidden_dim=64",
    "model.dim_feedforward=128",
    "model.nheads=4",
    "model.disc_nf=16",
    "data.size=64",
    "data.num_workers=0",
    "data.val_fraction=0.25",
    "data.min_colorfulness=0",
    "train.device=cpu",
    "train.batch_size=2",
    "train.log_every=1",
]


def tiny_train_config(*overrides: str):
    """`TINY_TRAIN` plus ``overrides`` (``"train.max_steps=2"``, ...) as a `ddcolor.config.Config`."""
    return load_config(None, [*TINY_TRAIN, *overrides])
