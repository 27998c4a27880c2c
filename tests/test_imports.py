"""Imports point one way (docs/architecture.md), read statically from the source.

The package's modules import each other at module level, in no circle; a
function-local import is allowed only where it keeps a heavy library out of
``ches-filter --help`` (a third-party library such as torch or pyarrow, or a
package module that imports torch at module level), and the module says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ches_filter"
#: Libraries whose import takes a noticeable part of a second (torch: seconds).
HEAVY = {"torch", "transformers", "datasets", "pyarrow", "numpy", "matplotlib", "tqdm", "safetensors", "gguf",
         "accelerate"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return found


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of the module a relative ``from`` import reads."""
    path = MODULES[module][0]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _eager_imports(module: str) -> set[str]:
    """Package modules and third-party top-level names ``module`` imports when it is imported."""
    found = set()
    for node in MODULES[module][1].body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, node)
            submodules = {f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in the module (or package) itself
                found.add(target)
    return found


def _heavy_at_import(module: str, seen: frozenset = frozenset()) -> bool:
    """Whether importing ``module`` imports a heavy library (through any chain of module-level imports)."""
    for name in _eager_imports(module):
        if name in HEAVY:
            return True
        if name in MODULES and name not in seen and _heavy_at_import(name, seen | {module}):
            return True
    return False


def _function_imports(tree: ast.Module):
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_module_level_imports_form_no_circle():
    graph = {m: {n for n in _eager_imports(m) if n in MODULES and n != m} for m in MODULES}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if other == "ches_filter":  # `from . import __version__`: the package's own __init__ imports nothing
                continue
            assert state.get(other) != 1, "import circle: " + " -> ".join([*path, module, other])
            if other not in state:
                visit(other, [*path, module])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])
    assert not _eager_imports("ches_filter") - {"__future__"}


def test_a_function_local_import_keeps_a_heavy_library_out_of_help_and_says_so():
    unjustified = []
    for module, (path, tree) in MODULES.items():
        lazy_heavy = False
        for node in _function_imports(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                target = _target(module, node)
                if target == "ches_filter":  # the package's lazy `score_pairs` attribute (PEP 562)
                    continue
                if not _heavy_at_import(target):
                    unjustified.append(f"{where}: {target} imports no heavy library; import it at module level")
                    continue
                line = path.read_text(encoding="utf-8").splitlines()[node.lineno - 1]
                if "# lazy:" not in line:
                    unjustified.append(f"{where}: say why it is lazy (`# lazy: ... imports torch`)")
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in HEAVY:
                        lazy_heavy = True
                    elif name.split(".")[0] != "__future__":
                        unjustified.append(f"{where}: {name} is not a heavy library; import it at module level")
        if lazy_heavy and "stays instant" not in path.read_text(encoding="utf-8"):
            unjustified.append(f"{path.relative_to(PACKAGE.parent)}: say that its heavy imports are lazy, and why")
    assert not unjustified, "\n".join(unjustified)


def test_the_check_finds_what_it_should():
    """The helpers see an eager heavy import through a chain, and a circle."""
    assert _heavy_at_import("ches_filter.engine") and _heavy_at_import("ches_filter.ches")
    assert not _heavy_at_import("ches_filter.cli") and not _heavy_at_import("ches_filter.validate")
    tree = ast.parse("def f():\n    from .records import Records\n    import json\n")
    assert [type(n).__name__ for n in _function_imports(tree)] == ["ImportFrom", "Import"]
