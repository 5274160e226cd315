"""Holes a hostile run found (issue 13), each reproduced against a real `fluxd serve --demo`."""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from tests.e2e.conftest import HTTP, Server


def _bilevel_png(side: int) -> bytes:
    """A 1-bit PNG of side x side: a few KB on the wire, side² x 3 bytes once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_many_huge_references_are_refused_from_their_headers(server: Server) -> None:
    """16 parts of 8192x8192 cost 192 MB each once decoded to RGB: three such requests took 12 GB."""
    part = _bilevel_png(8192)
    assert len(part) < 64 * 1024

    def send(count: int) -> httpx.Response:
        files = [("image[]", (f"{i}.png", part, "image/png")) for i in range(count)]
        return HTTP.post(f"{server.url}/v1/images/edits", data={"prompt": "p"}, files=files)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(send, [16, 16, 16]))
    within_count = send(4)  # flux.2-dev takes 4 references: refused by the request's pixel budget instead
    for answer in [*answers, within_count]:
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "image", answer.text
    assert "MP" in within_count.json()["error"]["message"]
    # The HTTP process (the worker is another process) never held the pixels: 4 GB per request before.
    assert _peak_rss_mb(server.process.pid) < 600


def test_long_numbers_and_texts_are_400s(server: Server) -> None:
    url = f"{server.url}/v1/images/generations"
    cases = {
        "size": {"size": "9" * 5000 + "x64"},
        "resolution": {"resolution": "1" + "0" * 400},
        "prompt_2": {"prompt_2": "x" * 40_000, "model": "flux.1-dev"},
    }
    with httpx.Client(timeout=60) as client:  # one keep-alive connection for every request
        for param, fields in cases.items():
            answer = client.post(url, json={"prompt": "p", **fields})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text[:300]
        assert client.get(f"{server.url}/health").status_code == 200


def _rotated_jpeg(width: int, height: int) -> bytes:
    """A width x height JPEG whose EXIF says to turn it a quarter (orientation 6), as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_exif_orientation_is_applied_to_references(server: Server) -> None:
    answer = HTTP.post(
        f"{server.url}/v1/images/edits",
        data={
            "prompt": "p",
            "model": "flux.1-kontext-dev",
            "resolution_mode": "match_input",
            "response_format": "b64_json",
            "num_inference_steps": "2",
        },
        files={"image": ("phone.jpg", _rotated_jpeg(128, 64), "image/jpeg")},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["size"] == "64x128"  # upright, as the phone showed it
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
    assert image.size == (64, 128)


def _url(server: Server, headers: dict[str, str]) -> str:
    answer = HTTP.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "p", "size": "64x64", "num_inference_steps": 2, "response_format": "url"},
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"][0]["url"]


def test_forwarded_headers_from_a_trusted_proxy_are_validated(server: Server) -> None:
    # The default trusts loopback, where the tests' requests come from, as a local reverse proxy's would.
    proxied = _url(server, {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gpu-box:8443"})
    assert proxied.startswith("https://gpu-box:8443/v1/files/images/")
    hostile = _url(server, {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "evil.example"})
    assert hostile.startswith(f"{server.url}/v1/files/images/")
    assert _url(server, {"X-Forwarded-Host": "evil.example/x?"}).startswith(server.url)


def test_forwarded_headers_from_anyone_else_are_ignored(strict_server: Server) -> None:
    url = _url(strict_server, {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    assert url.startswith(f"{strict_server.url}/v1/files/images/")


def _closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Send `trickle` a byte at a time, slowly, then wait: True when the server closes the connection."""
    sock.settimeout(30)
    for byte in trickle:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
        time.sleep(0.3)
    try:
        return sock.recv(1024) == b""
    except (TimeoutError, ConnectionResetError) as exc:
        return isinstance(exc, ConnectionResetError)


def test_idle_and_slow_connections_are_closed(strict_server: Server) -> None:
    port = int(strict_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert _closed_by_server(idle)  # connected, never sent a byte
    with socket.create_connection(("127.0.0.1", port)) as slow:
        assert _closed_by_server(slow, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaa")
    assert HTTP.get(f"{strict_server.url}/health").status_code == 200
