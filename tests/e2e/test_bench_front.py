"""`fluxd bench front --quick` as a user runs it: a real front over the instant worker, each cell measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.tools.bench_front import CONCURRENCY, FORMATS, PNG_LEVELS, RESPONSES


def test_bench_front_quick_measures_every_format_response_and_concurrency(tmp_path: Path) -> None:
    out = tmp_path / "front.md"
    done = subprocess.run(
        [sys.executable, "-m", "server.tools.cli", "bench", "front", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert table.strip() == done.stdout.strip()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    cells = {(r[0].strip(), r[1].strip(), int(r[2])) for r in rows if r[0].strip() in FORMATS}
    assert cells == {(f, r, c) for f in FORMATS for r in RESPONSES for c in CONCURRENCY}
    levels = [int(r[0]) for r in rows if r[0].strip().isdigit()]
    assert levels == list(PNG_LEVELS)
    assert "H100s of Turbo at 2 s an image" in table
