"""Ray stays optional: the plain install never imports it, and its settings are checked like the others."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.declarations.settings import Settings
from server.declarations.settings_loading import load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_the_http_side_imports_neither_ray_nor_torch() -> None:
    code = (
        "import sys, server.tools.cli, server.tools.bench; from server.app import create_app; "
        "from server.declarations.settings import Settings; create_app(Settings()); "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_serve_takes_a_ray_address_and_replica_settings_from_flags_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUXD_RAY_MAX_REPLICAS", "4")
    settings = load_settings(["--ray", "auto", "--ray-target-ongoing-requests", "2"])
    assert (settings.ray, settings.ray_min_replicas, settings.ray_max_replicas) == ("auto", 1, 4)
    assert settings.ray_target_ongoing_requests == 2.0
    monkeypatch.delenv("FLUXD_RAY_MAX_REPLICAS")
    assert load_settings().ray is None


def test_fewer_max_replicas_than_min_is_refused() -> None:
    with pytest.raises(ValidationError, match="ray_max_replicas"):
        Settings(ray="auto", ray_min_replicas=3, ray_max_replicas=2)
