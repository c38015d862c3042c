"""The package's layers, checked on the source: platform < domain < services < commands < cli.

Every module under src/corepipe is parsed (imports inside functions included); a module may import
its own layer or a lower one, never a higher one, and the imports between modules form no cycle.
``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
corepipe/__init__.py and __main__.py stand outside the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import corepipe

ROOT = Path(corepipe.__file__).resolve().parent
LAYERS = {"platform": 0, "domain": 1, "services": 2, "commands": 3, "cli": 4}


def _modules() -> dict:
    """Module name -> path, for every module of the package."""
    result = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["corepipe", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        result[".".join(parts)] = path
    return result


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _imports(path: Path, modules: dict) -> set:
    """The corepipe modules ``path`` imports, wherever in it the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name in modules}


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on_stack: set = set()
    result = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_every_module_is_in_a_layer() -> None:
    outside = {"corepipe", "corepipe.__main__"}
    assert [m for m in _modules() if _layer(m) is None and m not in outside] == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = [f"{importer} ({_layer(importer)}) imports {imported} ({_layer(imported)})"
              for importer, imports in _graph().items() for imported in sorted(imports)
              if _layer(importer) is not None and _layer(imported) is not None
              and _layer(imported) > _layer(importer)]
    assert upward == []


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_see_what_they_should() -> None:
    """The parser finds function-level imports and ``from pkg import module``; the cycle finder finds cycles."""
    graph = _graph()
    assert "corepipe.services.collect" in graph["corepipe.commands.collect_cmd"]  # imported inside run()
    assert "corepipe.platform.capture" in graph["corepipe.commands.collect_cmd"]  # from corepipe.platform import ...
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": set()}) == [["a", "b", "c"], ["d"]]
