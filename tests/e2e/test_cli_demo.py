"""`fluxd serve --demo` as the README has a user run it: the console script, its banner, an SDK image.

These tests start the installed `fluxd` entry point rather than `python -m server.tools.cli`, so a broken
`[project.scripts]` line fails here first.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.front.store import SUBFOLDER
from tests.e2e.conftest import Server, free_port, launch, stop_server

DEMO_SIZE = (256, 256)  # README: "Demo models default to 256x256"


def console_script() -> str:
    """The `fluxd` executable installed next to this interpreter (the venv need not be activated)."""
    beside = Path(sys.executable).with_name("fluxd")
    found = str(beside) if beside.exists() else shutil.which("fluxd")
    assert found, "the `fluxd` console script is not installed: pip install -e ."
    return found


def user_env(**overrides: str) -> dict[str, str]:
    """The environment of a user who has set no FLUXD_ variable, plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLUXD_")}
    return {**env, **overrides}


def assert_generates_an_image(server: Server) -> None:
    """What a user does next: the default model, no size, a URL response, fetched like any image link."""
    client = server.client(max_retries=0)
    result = client.images.generate(prompt="a red fox in the snow")
    [image] = result.data
    assert image.url and image.url.startswith(f"{server.url}/v1/files/images/")
    response = httpx.get(image.url, timeout=30)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == DEMO_SIZE


def banner_curl(log: str) -> str:
    """The ready-to-paste curl line the banner prints."""
    [line] = [line for line in log.splitlines() if line.startswith("try: curl ")]
    return line.removeprefix("try: ")


@pytest.mark.timeout(600)
def test_a_first_demo_run_writes_the_tiny_weights_prints_its_banner_serves_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    # A first-time user: nothing cached yet. XDG_CACHE_HOME moves ~/.cache/fluxd (weights and images) here.
    cache = tmp_path / "cache"
    port = free_port()
    command = [console_script(), "serve", "--demo", "--port", str(port)]
    env = user_env(XDG_CACHE_HOME=str(cache))
    server = launch(command, port, tmp_path / "fluxd.log", env, timeout_s=480, terminal=True)
    try:
        log = server.logs()
        tiny = cache / "fluxd" / "tiny"
        assert f"writing tiny random-weight checkpoints into {tiny}" in log
        assert (tiny / "flux.2-dev" / "model_index.json").exists()
        assert f"http://127.0.0.1:{port}/v1" in log
        assert f"playground: http://127.0.0.1:{port}/" in log
        assert "RANDOM weights" in log
        # The printed curl must work as pasted: run it through a shell exactly as printed.
        pasted = subprocess.run(
            ["bash", "-c", banner_curl(log)], capture_output=True, text=True, timeout=120, check=True
        )
        [image] = json.loads(pasted.stdout)["data"]
        assert Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))).size == DEMO_SIZE
        assert_generates_an_image(server)
        stored = cache / "fluxd" / "images" / SUBFOLDER
        assert any(stored.iterdir()), "the url image was not stored under the cache"
        assert "processor_kwargs" not in server.logs()  # a third-party warning silenced on purpose
        # A stop signal to the whole process group, as `timeout` or systemd sends it (a terminal's Ctrl-C
        # likewise): a clean exit, the worker gone and not restarted on the way out.
        [worker] = {int(pid) for pid in re.findall(r"\[worker (\d+)\]", server.logs())}
        os.killpg(server.process.pid, signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal it caught: -SIGTERM is the clean exit here.
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in server.logs()
        assert "restarting" not in server.logs()
        with pytest.raises(ProcessLookupError):
            os.kill(worker, 0)
    finally:
        stop_server(server)


def test_synthetic_weights_without_a_gpu_are_refused_plainly(tmp_path: Path) -> None:
    done = subprocess.run(
        [console_script(), "serve", "--weights", "synthetic", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=user_env(),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "needs CUDA devices" in done.stderr and "--devices cuda:0" in done.stderr
