"""CI runs the README's test command verbatim, and that command lints before it tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Test", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.DOTALL).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    assert "ruff check" in command and "pytest" in command
    assert command.index("ruff check") < command.index("pytest")
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in ci_lines


def test_ruff_is_pinned_in_the_test_extras():
    assert re.search(r'test = \[[^\]]*"ruff==[0-9.]+"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
