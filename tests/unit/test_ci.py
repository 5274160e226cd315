"""CI runs README's test command, the one a newcomer pastes."""

from __future__ import annotations

from pathlib import Path

from tests.readme_command import readme_test_command

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_command() -> None:
    command = readme_test_command((ROOT / "README.md").read_text())
    for step in (
        "pip install -e '.[test",
        "ruff check .",
        "ruff format --check .",
        "mypy",
        "python -m pytest",
    ):
        assert step in command
    run = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m tests.readme_command README.md" in run and 'bash -euo pipefail -c "$command"' in run
