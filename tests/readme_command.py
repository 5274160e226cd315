"""README's one "Run the tests" command: what a newcomer pastes and what .ci/run runs."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def readme_test_command(readme: str) -> str:
    section = readme.split("## Run the tests", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise ValueError("README's 'Run the tests' section has no bash block")
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"README's test command must be one line, not {len(lines)}")
    return lines[0]


if __name__ == "__main__":
    print(readme_test_command(Path(sys.argv[1]).read_text()))
