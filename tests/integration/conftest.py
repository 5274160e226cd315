"""The integration tests' Engine over the tiny checkpoints: one per test module, as a module's tests share
its loaded pipelines and caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> Engine:
    return Engine(SPECS, tiny_weights)
