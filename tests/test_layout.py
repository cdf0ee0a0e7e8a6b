"""The layout is the architecture: layer rules, no import cycles, short functions.

Read from the source with ``ast`` (nothing is imported), so a rule broken under
``TYPE_CHECKING`` or inside a function counts too: an import that only type checkers follow
is still a dependency a reader has to hold in mind.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamsync_trio"

# What each folder may import, besides itself.  "" is the package's top level (config, errors,
# OCI references, logging).  The entry points (app, __init__, __main__) assemble the layers
# and may import any of them.
MAY_IMPORT = {
    "": set(),
    "upstream": {""},
    "core": {"", "upstream"},
    "cluster": {"", "upstream", "core"},
    "edge": {"", "upstream", "core", "cluster"},
    "ops": {"", "upstream", "core", "cluster", "edge"},
}
ENTRY_POINTS = {"app", "__init__", "__main__"}
MAX_FUNCTION_LINES = 80


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(parts), path


def _is_package(module: str) -> bool:
    return (PACKAGE / module.replace(".", "/") / "__init__.py").exists()


def _imports(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports (a folder import means its ``__init__``)."""
    package = module.split(".")[:-1]  # the folder a relative import starts from
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [alias.name for alias in node.names]
            if target and not _is_package(target):
                found.add(target)
                continue
            prefix = f"{target}." if target else ""
            for name in names:
                submodule = f"{prefix}{name}"
                if (PACKAGE / (submodule.replace(".", "/") + ".py")).exists():
                    found.add(submodule)
                elif _is_package(submodule):
                    found.add(f"{submodule}.__init__")
            if target:
                found.add(f"{target}.__init__")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            if isinstance(node, ast.ImportFrom):
                absolute = [node.module or ""]
            else:
                absolute = [alias.name for alias in node.names]
            for name in absolute:
                if name and name.startswith("streamsync_trio"):
                    found.add(name.removeprefix("streamsync_trio").lstrip(".") or "__init__")
    found.discard(module)
    return found


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[0] if len(parts) > 1 else ""


GRAPH = {module: _imports(module, path) for module, path in _modules()}


def test_every_folder_says_what_it_is_for_and_what_it_may_import() -> None:
    folders = {path.parent for _, path in _modules() if path.parent != PACKAGE}
    assert folders, "the package has no layer folders"
    for folder in folders:
        assert folder.name in MAY_IMPORT, f"{folder.name}/ is not in the layer map"
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"{folder.name}/__init__.py lacks its rule"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    broken = [
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[-1] not in ENTRY_POINTS or _folder(module)
        for target in targets
        if _folder(target) != _folder(module) and _folder(target) not in MAY_IMPORT[_folder(module)]
    ]
    assert broken == []


def test_no_import_cycles() -> None:
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(GRAPH.get(module, ())):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(GRAPH):
        visit(module)


def test_no_function_is_longer_than_a_reader_holds() -> None:
    long = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
