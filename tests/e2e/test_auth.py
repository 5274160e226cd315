"""A safe LAN service: no public bind without a key, 401 in the OpenAI envelope, every key source works."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import FILE_KEYS, FLAG_KEYS, Server, start_server, stop_server
from tests.e2e.test_cli_demo import console_script, user_env

UNKNOWN_KEY = "e1"  # given by no flag and no file
FAST = {"num_inference_steps": 2}
# The SDK insists on a key; an Omit() header per request is how it sends none (its own error message says so).
NO_KEY = {"Authorization": openai.Omit()}


@pytest.fixture()
def keyed(keyed_server: Server) -> Server:
    """The shared keyed server (tests/e2e/conftest.py): --api-key flags and a key file on a loopback bind."""
    return keyed_server


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--host", "0.0.0.0"], {}),
        ([], {"FLUXD_HOST": "0.0.0.0"}),
        (["--host", "192.168.1.20", "--port", "8123"], {}),
        # An unset shell variable (`--api-key "$KEY"`) must not count as a key.
        (["--host", "0.0.0.0", "--api-key", ""], {}),
    ],
    ids=["flag", "env", "lan-address", "empty-key"],
)
def test_public_bind_without_a_key_refuses_to_start(tmp_path: Path, args: list[str], env: dict) -> None:
    command = [console_script(), "serve", "--weights-dir", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=user_env(**env), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--api-key" in done.stderr
    assert "--no-auth" in done.stderr


def test_no_auth_serves_the_network_with_a_warning(tiny_weights: Path, tmp_path: Path) -> None:
    # Bound to every interface only for this test, on a free port; spoken to over loopback.
    server = start_server(tiny_weights, tmp_path, "--host", "0.0.0.0", "--no-auth")
    try:
        assert server.client(max_retries=0).models.list(extra_headers=NO_KEY).data
        assert "WARNING fluxd: serving 0.0.0.0 WITHOUT authentication" in server.logs()
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    ("key", "headers"),
    [("unused", NO_KEY), ("k3", {}), ("k", {})],
    ids=["no key", "wrong key", "a key's prefix"],
)
def test_missing_or_wrong_key_is_401_in_the_openai_envelope(
    keyed: Server, key: str, headers: dict[str, openai.Omit]
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        keyed.client(key, max_retries=0).images.generate(
            prompt="a red fox", size="64x64", extra_body=FAST, extra_headers=headers
        )
    error = caught.value
    assert (error.status_code, error.code, error.type) == (401, "invalid_api_key", "invalid_request_error")
    assert error.request_id
    assert ("Missing API key" in error.message) == bool(headers)  # no header at all vs a bad one
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    assert error.response.headers["x-should-retry"] == "false"


def test_models_are_not_listed_without_a_key(keyed: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        keyed.client(max_retries=0).models.list(extra_headers=NO_KEY)


@pytest.mark.parametrize("key", FLAG_KEYS)
def test_either_flag_key_generates(keyed: Server, key: str) -> None:
    client = keyed.client(key, max_retries=0)
    result = client.images.generate(
        prompt="a red fox", size="64x64", response_format="b64_json", extra_body=FAST
    ).data
    assert len(result) == 1 and result[0].b64_json


@pytest.mark.parametrize("path", ["/health", "/ready", "/"])
def test_health_and_playground_stay_open(keyed: Server, path: str) -> None:
    response = httpx.get(keyed.url + path, timeout=10)
    assert response.status_code == 200, response.text
    if path == "/":
        assert response.headers["content-type"].startswith("text/html")


def test_keys_from_a_key_file_join_the_flags(keyed: Server) -> None:
    # FLUXD_API_KEYS, the flags' environment form, is how test_async_jobs.py's servers get their keys.
    for key in FLAG_KEYS + FILE_KEYS:
        assert keyed.client(key, max_retries=0).models.list().data, key
    with pytest.raises(openai.AuthenticationError):
        keyed.client(UNKNOWN_KEY, max_retries=0).models.list()
