"""The test suite's own layout: test modules live in a layer folder and share code only through `tests.helpers`.

A test module that imports ``conftest`` or another ``test_*`` module couples two test files (and runs the other's
module-level code); a ``sys.path`` edit makes imports depend on which file ran first. Fixtures go in conftest.py,
shared functions in tests/helpers/, and pytest's ``pythonpath = ["."]`` (pyproject.toml) puts the checkout root on
the path once.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LAYERS = {"unit", "model", "data", "training", "integration", "flows", "infra"}


def _module_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement loads (``from . import x`` gives ``x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [alias.name if not node.module else f"{node.module}.{alias.name}" for alias in node.names]


def _is_sys_path(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def layout_problems(path: Path, root: Path = TESTS.parent) -> list[str]:
    """What in the module at ``path`` breaks the layout rules, as ``file:line: reason`` lines (file relative to
    ``root``). Reading ``sys.path`` and pytest's ``monkeypatch`` (restored after the test) are allowed."""
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = _module_names(node)
            tests = [n for n in names if any(part.startswith("test_") for part in n.split("."))]
            if any("conftest" in n.split(".") for n in names):
                problems.append(f"{where}:{node.lineno}: imports conftest; move the helper to tests/helpers/")
            elif tests:
                problems.append(f"{where}:{node.lineno}: imports test module {tests[0]}; move it to tests/helpers/")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value):
            problems.append(f"{where}:{node.lineno}: sys.path.{node.func.attr}(); use pythonpath in pyproject.toml")
        elif isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_is_sys_path(t) for t in targets):
                problems.append(f"{where}:{node.lineno}: assigns sys.path; use pythonpath in pyproject.toml")
    return problems


def test_the_checker_finds_each_kind_of_problem(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "import sys\n"
        "from conftest import free_port\n"
        "import tests.conftest\n"
        "from test_train import TINY\n"
        "from tests.training.test_train import TINY\n"
        "from . import test_other\n"
        "sys.path.insert(0, 'x')\n"
        "sys.path += ['y']\n"
        "from tests.helpers.servers import free_port\n"
        "paths = [p for p in sys.path]\n"
    )
    lines = sorted(int(p.split(":")[1]) for p in layout_problems(bad, root=tmp_path))
    assert lines == [2, 3, 4, 5, 6, 7, 8]


def test_test_modules_sit_in_a_layer_folder():
    misplaced = [
        str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py") if p.relative_to(TESTS).parts[0] not in LAYERS
    ]
    assert not misplaced, f"test modules outside the layer folders {sorted(LAYERS)}: {misplaced}"


def test_no_test_module_imports_conftest_or_another_test_module_or_edits_sys_path():
    modules = sorted(p for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert len(modules) > 40  # the scan found the suite
    problems = [problem for path in modules for problem in layout_problems(path)]
    assert not problems, "\n".join(problems)
