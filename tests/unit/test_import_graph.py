"""The ``ddcolor`` package imports one way: no module reaches itself through module-level imports.

A cycle between modules is a layering mistake (e.g. the MLflow serving model that once made ``colorize`` ->
``registry`` -> ``tracking`` -> ``colorize``) even when function-local imports keep it from crashing at import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ddcolor

ROOT = Path(ddcolor.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: top level, and inside top-level try/if blocks (but not
    ``if TYPE_CHECKING:``); never inside functions or classes."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
    return found


def _import_graph() -> dict[str, set[str]]:
    """``{module: {ddcolor modules it imports at module level}}``; ``from pkg import sub`` counts as ``pkg.sub``."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in paths else base)
        # a module's own parent packages are imported first anyway: not a dependency it chose
        parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in paths and t != name and t not in parents}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_real_imports():
    graph = _import_graph()
    assert "ddcolor.tracking.client" in graph["ddcolor.registry"]
    assert "ddcolor.tracking.tracker" in graph["ddcolor.tracking"]
    assert "ddcolor.train.checkpoint" in graph["ddcolor.train.trainer"]  # `from ddcolor.train import checkpoint`
    assert "ddcolor.tracking.pyfunc" not in graph["ddcolor.tracking"]  # lazy, inside __getattr__


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_ddcolor_import_graph_is_acyclic():
    cycle = _cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_tracking_client_is_a_leaf():
    """The MLflow client helpers import no other ddcolor module at module level (the registry, the tracker, the
    pipeline and the playground all sit on top of them)."""
    assert _import_graph()["ddcolor.tracking.client"] == set()
    assert _import_graph()["ddcolor.tracking.context"] == set()
