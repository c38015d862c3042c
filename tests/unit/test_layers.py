"""The package's layers, checked on the source: platform < domain < services < commands < cli.

Every module under src/corepipe is parsed (imports inside functions included); a module may import
its own layer or a lower one, never a higher one, and the imports between modules form no cycle.
``from pkg import name`` counts as importing ``pkg.name`` when that is a module, else ``pkg``.
corepipe/__init__.py and __main__.py stand outside the layers.

Within a layer, two more rules keep its parts apart:
- a command (``commands/*_cmd.py``) imports no other command: what commands share lives in the helper modules
  of commands/ that are not commands (options, lookup, output, times) or lower;
- a service uses another service only through its public names: no ``from corepipe.services.x import _name``
  and no ``x._name`` on another service's module. A service is a module of services/ or a package there
  (``services/serve/``: its modules may use each other's ``_names``).
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
    return _imported(ast.parse(path.read_text(), str(path)), modules)


def _imported(tree: ast.AST, modules: dict) -> set:
    found = set()
    for node in ast.walk(tree):
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


def _command(module: str) -> bool:
    return module.startswith("corepipe.commands.") and module.endswith("_cmd")


def _commands_importing_commands(graph: dict) -> list:
    return [f"{importer} imports {imported}" for importer, imports in sorted(graph.items()) if _command(importer)
            for imported in sorted(imports) if _command(imported) and imported != importer]


def _service(module: str) -> str | None:
    """The service a module belongs to: ``corepipe.services.serve.worker`` -> ``serve``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "services" else None


def _private_uses(tree: ast.AST, modules: dict) -> list:
    """(module, name) for each ``_name`` (not a dunder) of a corepipe module this code imports or reads."""
    bound = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    bound[alias.asname or alias.name] = sub
                elif node.module in modules and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            bound.update({alias.asname: alias.name for alias in node.names if alias.asname and alias.name in modules})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = bound.get(node.value.id) if isinstance(node.value, ast.Name) else ast.unparse(node.value)
            if owner in modules:
                found.append((owner, node.attr))
    return found


def _services_using_internals(modules: dict) -> list:
    return [f"{module} uses {owner}.{name}" for module, path in sorted(modules.items()) if _service(module)
            for owner, name in _private_uses(ast.parse(path.read_text(), str(path)), modules)
            if _service(owner) not in (None, _service(module))]


def test_no_command_imports_another_command() -> None:
    assert _commands_importing_commands(_graph()) == []


def test_no_service_uses_another_services_internals() -> None:
    assert _services_using_internals(_modules()) == []


def test_the_checks_see_what_they_should() -> None:
    """The parser finds function-level imports and ``from pkg import module``; the cycle finder finds cycles."""
    graph = _graph()
    assert "corepipe.services.collect" in graph["corepipe.commands.collect_cmd"]  # imported inside run()
    assert "corepipe.platform.capture" in graph["corepipe.commands.collect_cmd"]  # from corepipe.platform import ...
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": set()}) == [["a", "b", "c"], ["d"]]
    assert _commands_importing_commands({"corepipe.commands.a_cmd": {"corepipe.commands.b_cmd",
                                                                     "corepipe.commands.output"}}) == [
        "corepipe.commands.a_cmd imports corepipe.commands.b_cmd"]
    modules = _modules()
    code = ("from corepipe.services import collect\nimport corepipe.services.ship as shipping\n"
            "from corepipe.services.install import _private, Paths\n"
            "def f():\n    collect._stage(); shipping._x; corepipe.services.prune._y; collect.run; collect.__doc__\n")
    assert sorted(_private_uses(ast.parse(code), modules)) == [
        ("corepipe.services.collect", "_stage"), ("corepipe.services.install", "_private"),
        ("corepipe.services.prune", "_y"), ("corepipe.services.ship", "_x")]
    assert _service("corepipe.services.serve.worker") == "serve" and _service("corepipe.domain.fleet") is None
