"""README's two set-up commands, read from README.md itself so CI runs exactly what users run.

    python3 .ci/readme_commands.py first           README's first command (install, then prune the sample)
    python3 .ci/readme_commands.py first-install   its install part (the `pip install ...` steps before `ches-filter`)
    python3 .ci/readme_commands.py second          README's second command (install the test extras, run the suite)
    python3 .ci/readme_commands.py second-install  its install part

The commands are the first two ```bash blocks under "## Set-up: two commands";
each is one line of `&&`-joined steps. Anything else is an error (exit 1), so a
README edit that moves or splits them fails CI instead of testing something else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## Set-up: two commands"
README = Path(__file__).resolve().parents[1] / "README.md"


def commands(text: str) -> list[str]:
    """The two commands of README's set-up section."""
    start = text.find(SECTION)
    if start < 0:
        raise ValueError(f"README.md has no section {SECTION!r}")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    if len(blocks) < 2:
        raise ValueError(f"README.md's {SECTION!r} has {len(blocks)} ```bash block(s), not two")
    out = []
    for block in blocks[:2]:
        lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
        if len(lines) != 1:
            raise ValueError(f"a set-up block of README.md holds {len(lines)} commands, not one: {block!r}")
        out.append(" ".join(lines[0].split()))
    return out


def install_part(command: str) -> str:
    """The leading `pip install ...` steps of ``command`` (up to the first step that is not one)."""
    steps = [s.strip() for s in command.split("&&")]
    install = []
    for step in steps:
        if not step.startswith("pip install "):
            break
        install.append(step)
    if not install or len(install) == len(steps):
        raise ValueError(f"README command {command!r} does not start with `pip install` steps followed by a run")
    return " && ".join(install)


def main(argv: list[str]) -> int:
    which = {"first": (0, False), "first-install": (0, True), "second": (1, False), "second-install": (1, True)}
    if len(argv) != 1 or argv[0] not in which:
        print(f"usage: readme_commands.py {{{','.join(which)}}}", file=sys.stderr)
        return 2
    index, install = which[argv[0]]
    try:
        command = commands(README.read_text(encoding="utf-8"))[index]
        print(install_part(command) if install else command)
    except ValueError as exc:
        print(f"readme_commands.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
