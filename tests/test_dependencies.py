"""Every third-party module the package imports is a declared requirement (read statically from the source).

A clean install gets ``install_requires`` and nothing else, so a module that is
imported but only arrives through the development machine's site-packages (as
scipy once did, through pandas' Spearman) is a traceback for every new user.
Modules of an extra must be imported lazily (inside a function) and the
package must name the extra's install command.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ches_filter"

#: Import names whose distribution is named otherwise, for modules not installed here
#: (when installed, importlib.metadata.packages_distributions() says it).
KNOWN_DISTRIBUTIONS = {
    "yaml": "PyYAML", "PIL": "Pillow", "sklearn": "scikit-learn", "cv2": "opencv-python",
    "google.protobuf": "protobuf", "bs4": "beautifulsoup4", "dateutil": "python-dateutil",
    "attr": "attrs", "jwt": "PyJWT", "serial": "pyserial", "Crypto": "pycryptodome",
}


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(source: str) -> dict[str, bool]:
    """Top-level names of the absolute imports in ``source`` -> whether any of them runs at import time.

    An import inside a function or method is lazy; anything else (module level,
    class bodies, module-level ``if``/``try``) runs when the module is imported.
    ``if TYPE_CHECKING:`` blocks never run and are skipped.
    """
    found: dict[str, bool] = {}

    def visit(node: ast.AST, eager: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                for orelse in child.orelse:
                    visit(ast.Module(body=[orelse], type_ignores=[]), eager)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ches_filter" or top == "__future__":
                    continue
                found[top] = found.get(top, False) or eager
            lazy = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, eager and not lazy)

    visit(ast.parse(source), True)
    return found


def package_imports() -> dict[str, dict[str, bool]]:
    """module name -> {file: imported at import time} over every file of ches_filter/."""
    out: dict[str, dict[str, bool]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, eager in third_party_imports(path.read_text(encoding="utf-8")).items():
            out.setdefault(name, {})[str(path.relative_to(REPO))] = eager
    return out


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(install_requires, {extra: requirements}) of setup.cfg, as normalised distribution names."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg", encoding="utf-8")

    def names(text: str) -> set[str]:
        return {normalize(re.match(r"[A-Za-z0-9._-]+", line.strip()).group(0))
                for line in text.splitlines() if line.strip() and not line.strip().startswith("#")}

    extras = {extra: names(text) for extra, text in cfg["options.extras_require"].items()}
    return names(cfg["options"]["install_requires"]), extras


def distributions_of(module: str) -> set[str]:
    """The distributions that provide the import name ``module`` (normalised)."""
    installed = importlib.metadata.packages_distributions().get(module)
    if installed:
        return {normalize(d) for d in installed}
    return {normalize(KNOWN_DISTRIBUTIONS.get(module, module))}


def undeclared(imports: dict[str, dict[str, bool]], requires: set[str], extras: dict[str, set[str]],
               package_text: str) -> list[str]:
    """One line per import that a clean ``pip install ches-filter`` would not satisfy."""
    problems = []
    for module, files in sorted(imports.items()):
        dists = distributions_of(module)
        if dists & requires:
            continue
        in_extras = sorted(e for e, reqs in extras.items() if dists & reqs and e != "test")
        where = ", ".join(sorted(files))
        if not in_extras:
            problems.append(f"{module} (distribution {'/'.join(sorted(dists))}) is imported by {where} but is "
                            "neither in install_requires nor in a user-facing extra of setup.cfg")
            continue
        eager = sorted(f for f, e in files.items() if e)
        if eager:
            problems.append(f"{module} belongs to the extra {in_extras} but {', '.join(eager)} imports it at "
                            "module level; import it inside the function that needs it")
        if not any(f"ches-filter[{e}]" in package_text for e in in_extras):
            problems.append(f"{module} belongs to the extra {in_extras} but no message of the package names "
                            f'`pip install "ches-filter[{in_extras[0]}]"`')
    return problems


def test_every_third_party_import_is_declared():
    requires, extras = declared()
    text = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    problems = undeclared(package_imports(), requires, extras, text)
    assert not problems, "\n".join(problems)


def test_the_check_catches_what_a_clean_install_lacks():
    """The checker itself: stdlib and relative imports pass; an undeclared or eager extra import does not."""
    source = (
        "import os, json\nfrom . import io\nfrom typing import TYPE_CHECKING\n"
        "import torch\nimport yaml\nimport matplotlib\n"
        "if TYPE_CHECKING:\n    import pandas\n"
        "def f():\n    import scipy.stats\n"
    )
    imports = {name: {"mod.py": eager} for name, eager in third_party_imports(source).items()}
    assert imports == {"torch": {"mod.py": True}, "yaml": {"mod.py": True}, "matplotlib": {"mod.py": True},
                       "scipy": {"mod.py": False}}
    problems = undeclared(imports, {"torch"}, {"report": {"matplotlib"}, "test": {"scipy"}}, "")
    assert len(problems) == 4, problems
    assert any(p.startswith("yaml (distribution pyyaml)") for p in problems)  # import name -> distribution name
    assert any(p.startswith("scipy") for p in problems)  # a test extra is not what users install
    assert sum(p.startswith("matplotlib") for p in problems) == 2  # eager, and no install hint
    assert undeclared({"matplotlib": {"mod.py": False}}, set(), {"report": {"matplotlib"}},
                      'pip install "ches-filter[report]"') == []


@pytest.mark.parametrize("blocked", ["scipy", "pandas"])
def test_rank_correlation_needs_neither_scipy_nor_pandas(monkeypatch, blocked):
    """A clean install has no scipy (and need not import pandas): Spearman still works, with ties."""
    from ches_filter.stats import rank_correlation

    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # `import scipy` now raises ImportError
    assert rank_correlation([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
