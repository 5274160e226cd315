"""Shared fixtures: the tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tools.tiny import write_tiny

    root = tmp_path_factory.mktemp("weights")
    write_tiny(root)
    return root
