"""The `ddcolor.cli` package: every command function is registered, importing it stays light (``--help`` and shell
completion start fast), and the promotion records the CLI prints come from `ddcolor.pipeline`."""

from __future__ import annotations

import inspect
import subprocess
import sys
from types import SimpleNamespace

import typer

from ddcolor import cli
from ddcolor.cli import colorize, data, evaluate, pipeline, registry, train, ui, weights
from ddcolor.config import load_config
from ddcolor.pipeline import promotion_record, rollback_record


def _registered_callbacks(app: typer.Typer) -> set:
    found = {info.callback for info in app.registered_commands}
    for group in app.registered_groups:
        found |= _registered_callbacks(group.typer_instance)
    return found


def test_every_command_function_is_registered():
    registered = _registered_callbacks(cli.app)
    modules = (colorize, data, evaluate, pipeline, registry, train, ui, weights)
    defined = {
        fn
        for module in modules
        for name, fn in inspect.getmembers(module, inspect.isfunction)
        if fn.__module__ == module.__name__ and (name.endswith("_command") or module in (weights,))
        and not name.startswith("_")
    }  # fmt: skip
    assert defined and defined <= registered, f"not registered: {sorted(f.__name__ for f in defined - registered)}"


def test_importing_the_cli_loads_no_heavy_library():
    code = "import sys, ddcolor.cli; print(sorted(m for m in ('torch', 'mlflow', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_rollback_record_has_the_promotion_record_format():
    cfg = load_config(None, ["registry.model_name=m", "registry.champion_alias=champion"])
    decision = SimpleNamespace(passed=True, to_dict=lambda: {"checks": [{"name": "max_fid", "passed": True}]})
    promoted = SimpleNamespace(promoted=True, champion="3", previous_champion="2")
    record, line = promotion_record(cfg, "run1", "3", decision, promoted)
    assert record["decision"] == "promoted" and line.startswith("promoted m version 3 to @champion")
    back, line = rollback_record(cfg, SimpleNamespace(version="2", champion="2", previous_champion="3"))
    assert back == {
        "decision": "rolled_back", "promoted": True, "model_name": "m", "version": "2", "champion": "2",
        "previous_champion": "3",
    }  # fmt: skip
    assert set(back) <= set(record) | {"decision"} and line == "rolled back m@champion: version 3 -> 2"
