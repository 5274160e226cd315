"""Hostile input on the webhook, LoRA and settings surfaces, against a real `fluxd serve`: webhook URLs that
climb out of the allow-list, LoRA names past the file system's limit, LoRA files damaged at the byte level,
secrets in start-up errors, 405s and the stream's place in /openapi.json."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from pipelines.contract.lora_catalog import FOLDER
from tests.damaged_loras import DAMAGES, write_damaged
from tests.e2e import test_async_jobs, test_loras_served
from tests.e2e.conftest import HTTP, Server, start_server, stop_server, wait_until
from tests.e2e.test_async_jobs import ASYNC, Receiver
from tests.e2e.test_loras_served import FLUX2_LORA as LORA

KEY = "sk-hostile-api-key-0123456789"
SECRET = "whsec_" + base64.b64encode(b"hostile-run webhook secret 32 b!").decode()
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"prompt": "x", "size": "64x64", "num_inference_steps": 2, "response_format": "b64_json"}
# The webhook receiver and the LoRA tests' weights (the tiny checkpoints, their LoRAs, two files that are no
# LoRA), as those modules' fixtures make them.
receiver = test_async_jobs.receiver
weights = test_loras_served.weights


@pytest.fixture(scope="module")
def damaged(weights: Path) -> Path:
    """The LoRA tests' weights with one damaged LoRA file per kind of damage beside them."""
    write_damaged(weights / FOLDER)
    return weights


@pytest.fixture(scope="module")
def served(damaged: Path, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Server]:
    env = {
        "FLUXD_API_KEYS": KEY,
        "FLUXD_WEBHOOK_ALLOW": f"{receiver.url}/hooks",
        "FLUXD_WEBHOOK_SECRET": SECRET,
    }
    server = start_server(damaged, tmp_path_factory.mktemp("hostile"), env=env)
    yield server
    stop_server(server)


def generate(server: Server, headers: dict[str, str] | None = None, **fields: object) -> httpx.Response:
    return HTTP.post(
        f"{server.url}/v1/images/generations", json={**FAST, **fields}, headers={**AUTH, **(headers or {})}
    )


def refused(answer: httpx.Response, param: str) -> str:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param, error
    return error["message"]


# Hole 2: the allow-list compares the URL that is sent.


@pytest.mark.parametrize(
    "path", ["/hooks/../admin", "/hooks/%2e%2e/admin", "/hooks/./x/../../admin", "/hooks/..%2Fadmin"]
)
def test_a_webhook_url_climbing_out_of_the_allowed_prefix_is_a_400(
    served: Server, receiver: Receiver, path: str
) -> None:
    refused(generate(served, ASYNC, webhook_url=receiver.url + path), "webhook_url")


def test_a_webhook_goes_to_exactly_the_normal_url_that_was_compared(
    served: Server, receiver: Receiver
) -> None:
    answer = generate(served, ASYNC, webhook_url=f"{receiver.url}/hooks/a/../done/%7Ehere")
    assert answer.status_code == 202, answer.text
    wait_until(lambda: bool(receiver.posts("/hooks/done/~here")), timeout=120)
    assert [path for path, _, _ in receiver.received if not path.startswith("/hooks/")] == []


# Hole 3: a name is bounded where the field is declared.


@pytest.mark.parametrize("name", ["a" * 256, "é" * 255, "x/" * 127 + "y"])
def test_a_lora_name_past_the_file_systems_limit_is_a_400(served: Server, name: str) -> None:
    refused(generate(served, loras=[{"path": name}]), "loras")
    assert generate(served).status_code == 200


# Holes 4 and 5: damaged LoRA files.


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_lora_file_is_a_400_naming_loras_and_the_file(served: Server, damage: str) -> None:
    message = refused(generate(served, loras=[{"path": damage}]), "loras")
    assert f"{damage}.safetensors" in message


def test_damaged_files_are_listed_unusable_and_the_rest_served(served: Server, damaged: Path) -> None:
    answer = HTTP.get(f"{served.url}/v1/loras", headers=AUTH)
    assert answer.status_code == 200, answer.text
    listing = answer.json()
    assert LORA in [lora["id"] for lora in listing["data"]]
    reasons = {entry["id"]: entry["error"] for entry in listing["unreadable"]}
    assert all(f"{damage}.safetensors" in reasons[damage] for damage in DAMAGES)
    assert generate(served, loras=[{"path": LORA}]).status_code == 200

    command = [sys.executable, "-m", "server.tools.cli", "weights", "list", "--dir", str(damaged)]
    listed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert any(line.startswith(LORA) and "LoRA" in line for line in lines)
    for damage in DAMAGES:
        [line] = [line for line in lines if line.startswith(f"{damage} ")]
        assert "unreadable" in line and f"{damage}.safetensors" in line


# Holes 6 and 7: secrets and start-up errors.


def start_up_error(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "server.tools.cli", "serve", *flags]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLUXD_")}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


def test_no_start_up_error_shows_a_secret(tmp_path: Path) -> None:
    short = "whsec_" + base64.b64encode(b"too short").decode()
    mistyped = SECRET[:-4] + "!?#="
    config = tmp_path / "fluxd.toml"
    config.write_text(f'api_keys = ["{KEY}"]\nwebhook_secret = "{SECRET}"\nqueue_size = \n')
    typed = tmp_path / "typed.toml"
    typed.write_text(f'api_keys = ["{KEY}"]\nwebhook_secret = {int.from_bytes(SECRET.encode()[:12])}\n')
    hooks = ("--webhook-allow", "http://127.0.0.1:9/hooks")
    runs = {
        "short": start_up_error("--api-key", KEY, *hooks, "--webhook-secret", short),
        "mistyped": start_up_error("--api-key", KEY, *hooks, "--webhook-secret", mistyped),
        "env": start_up_error("--api-key", KEY, *hooks, env={"FLUXD_WEBHOOK_SECRET": mistyped}),
        "env keys": start_up_error(*hooks, env={"FLUXD_WEBHOOK_SECRET": short, "FLUXD_API_KEYS": KEY}),
        "whole config": start_up_error(
            "--api-key",
            KEY,
            *hooks,
            "--webhook-secret",
            SECRET,
            "--ray-min-replicas",
            "2",
            "--ray-max-replicas",
            "1",
        ),
        "toml": start_up_error("--config", str(config)),
        "toml types": start_up_error("--config", str(typed)),
    }
    secrets = [KEY, SECRET, short, mistyped, str(int.from_bytes(SECRET.encode()[:12]))]
    for what, run in runs.items():
        output = run.stdout + run.stderr
        assert run.returncode == 2, (what, output)
        assert output.startswith("fluxd: ") and "Traceback" not in output, (what, output)
        assert not [secret for secret in secrets if secret in output], (what, output)
    assert "ray_max_replicas (1) is below ray_min_replicas (2)" in runs["whole config"].stderr
    assert "webhook_secret" in runs["short"].stderr and "webhook_secret" in runs["env"].stderr


def test_a_bad_webhook_allow_entry_is_one_line_exit_2_its_password_masked() -> None:
    run = start_up_error("--webhook-allow", "https://ops:hunter2@hooks.lan/fluxd", "--webhook-secret", SECRET)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("fluxd: webhook_allow")
    assert "hunter2" not in run.stderr and "ops:" not in run.stderr and "https://***@hooks.lan" in run.stderr


def test_no_answer_and_no_log_line_holds_a_secret(served: Server) -> None:
    answers = [
        HTTP.get(f"{served.url}/v1/models", headers=AUTH),
        HTTP.get(f"{served.url}/ready"),
        HTTP.get(f"{served.url}/metrics"),
        HTTP.get(f"{served.url}/openapi.json"),
        generate(served, ASYNC, webhook_url="http://elsewhere/x"),
        HTTP.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer wrong"}),
    ]
    for answer in answers:
        assert KEY not in answer.text and SECRET not in answer.text
        assert SECRET.removeprefix("whsec_") not in answer.text
    assert KEY not in served.logs() and SECRET.removeprefix("whsec_") not in served.logs()


# Hole 10: protocol.

# A route of each kind: plain, with a path parameter, served by two routes (GET and DELETE), a file, a POST.
NOT_ALLOWED = [
    ("TRACE", "/health", "GET"),
    ("POST", "/ready", "GET"),
    ("PUT", "/metrics", "GET"),
    ("DELETE", "/v1/models", "GET"),
    ("PATCH", "/v1/models/flux.2-dev", "GET"),
    ("PUT", "/v1/loras", "GET"),
    ("PUT", "/v1/images/jobs/job_x", "GET, DELETE"),
    ("GET", "/v1/images/generations", "POST"),
    ("DELETE", "/v1/images/edits", "POST"),
    ("PUT", "/v1/files/images/x.png", "GET, HEAD"),
    ("POST", "/openapi.json", "GET, HEAD"),
]


@pytest.mark.parametrize(("method", "path", "allow"), NOT_ALLOWED)
def test_every_405_says_what_is_allowed(served: Server, method: str, path: str, allow: str) -> None:
    answer = HTTP.request(method, served.url + path, headers=AUTH)
    assert answer.status_code == 405, answer.text
    assert answer.headers["allow"] == allow
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_the_stream_and_its_events_are_in_the_openapi_document(served: Server) -> None:
    document = HTTP.get(f"{served.url}/openapi.json").json()
    for path, kind in (("/v1/images/generations", "image_generation"), ("/v1/images/edits", "image_edit")):
        described = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
        names = [event["properties"]["event"]["const"] for event in described["x-itemSchema"]["oneOf"]]
        assert names == [f"{kind}.partial_image", f"{kind}.completed", "error"]
    answers = document["paths"]["/v1/images/generations"]["post"]["responses"]["200"]["content"]
    stream = answers["text/event-stream"]["x-itemSchema"]["oneOf"]
    schemas = {event["properties"]["event"]["const"]: event["properties"]["data"] for event in stream}
    body = {**FAST, "stream": True, "partial_images": 1, "num_inference_steps": 6}
    seen = []
    with HTTP.stream("POST", f"{served.url}/v1/images/generations", json=body, headers=AUTH) as answer:
        assert answer.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = schemas[event]["contentSchema"]
                # The document is the root, so the data's $ref to #/components/... resolves in it.
                jsonschema.validate(json.loads(line.removeprefix("data: ")), {**document, **data})
                seen.append(event)
    assert seen == ["image_generation.partial_image", "image_generation.completed"]
