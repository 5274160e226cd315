"""The url image store against a real server: it touches only its own files, urls outlive a restart, and a
store that cannot write (a file in its way, a read-only or a full filesystem) still hands every image over.

The read-only and full-disk cases mount a small tmpfs (root only); they skip where mounting is refused."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from server.front.store import SUBFOLDER
from tests.e2e.conftest import HTTP, Server, start_server, stop_server, wait_until
from tests.imagery import png

PNG_MAGIC = b"\x89PNG"


def generate(server: Server, seed: int = 0, size: str = "64x64") -> httpx.Response:
    """One url image; the demo's 64x64 noise is about 10 kB of PNG."""
    body = {"prompt": "x", "size": size, "num_inference_steps": 2, "seed": seed, "response_format": "url"}
    response = HTTP.post(f"{server.url}/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    return response


def url_of(server: Server, seed: int = 0) -> str:
    return generate(server, seed).json()["data"][0]["url"]


def store_health(server: Server) -> dict:
    return HTTP.get(f"{server.url}/ready").json()["store"]


@contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "fluxd-test", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(folder)]).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


def test_the_store_deletes_only_its_own_files(tiny_weights: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "documents"
    foreign = {
        store_dir / "thesis.docx": b"years of work",
        store_dir / "holiday.png": png(16, 16),
        store_dir / f"{secrets.token_urlsafe(24)}.png": b"named as the store names, but beside its folder",
        store_dir / SUBFOLDER / "notes.png": b"in the store's folder, under a name it never gives",
        store_dir / SUBFOLDER / f"{secrets.token_urlsafe(24)}.txt": b"an id, with an extension never written",
    }
    for path, data in foreign.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (946684800, 946684800))  # from 2000: long past any TTL
    server = start_server(
        tiny_weights,
        tmp_path,
        *("--store-dir", str(store_dir), "--image-ttl", "3", "--store-quota-mb", "0.015"),
        env={"FLUXD_STORE_SWEEP_INTERVAL_S": "0.5"},
    )
    try:
        first, second = url_of(server, seed=1), url_of(server, seed=2)
        assert HTTP.get(first).status_code == 404  # the 15 kB quota holds one 10 kB image: the oldest went
        assert HTTP.get(second).status_code == 200
        wait_until(lambda: HTTP.get(second).status_code == 404)  # its TTL
        # The sweeper deletes the store's expired file without a request asking it to.
        wait_until(lambda: len(list((store_dir / SUBFOLDER).iterdir())) == 2)
    finally:
        stop_server(server)
    assert {path: path.read_bytes() for path in foreign} == foreign


def test_a_store_that_cannot_write_hands_images_over_inline_until_it_can(
    tiny_weights: Path, tmp_path: Path
) -> None:
    """A file in the store's way: images come inline until it is moved away, then as urls, which outlive a
    restart and are cached for their remaining life."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    in_the_way = store_dir / SUBFOLDER
    in_the_way.write_text("a file where the store's folder would go")
    flags = ("--store-dir", str(store_dir), "--image-ttl", "600")
    server = start_server(tiny_weights, tmp_path, *flags, env={"FLUXD_STORE_SWEEP_INTERVAL_S": "0.5"})
    try:
        ready = HTTP.get(f"{server.url}/ready")
        assert ready.status_code == 200  # every image still reaches its client
        assert ready.json()["store"]["writable"] is False
        assert "Not a directory" in ready.json()["store"]["reason"]
        raw = server.client(max_retries=0).images.with_raw_response.generate(
            prompt="x", size="32x32", response_format="url", extra_body={"num_inference_steps": 2}
        )
        assert "Not a directory" in raw.headers["x-fluxd-store-error"]
        [image] = raw.parse().data  # the SDK's strict validation
        assert image.url is None and base64.b64decode(image.b64_json).startswith(PNG_MAGIC)
        assert in_the_way.read_text() == "a file where the store's folder would go"  # left as it was

        in_the_way.unlink()
        wait_until(lambda: store_health(server)["writable"])  # the sweeper tries again
        path = urlparse(url_of(server)).path
        stored = HTTP.get(server.url + path)
        assert stored.status_code == 200 and stored.content.startswith(PNG_MAGIC)
        cache_control = stored.headers["cache-control"]
        assert cache_control.startswith("private, max-age=")
        assert 0 < int(cache_control.removeprefix("private, max-age=")) <= 600
        # Requests read the store's index, not its folder: a file put there behind its back is not served...
        dropped = f"/v1/files/images/{secrets.token_urlsafe(24)}.png"
        (store_dir / SUBFOLDER / dropped.rsplit("/", 1)[1]).write_bytes(stored.content)
        assert HTTP.get(server.url + dropped).status_code == 404
    finally:
        stop_server(server)
    server = start_server(tiny_weights, tmp_path, *flags)
    try:
        # ...until a start-up indexes the folder again, so the urls given before it keep working.
        assert HTTP.get(server.url + path).content == stored.content
        assert HTTP.get(server.url + dropped).content == stored.content
        assert store_health(server)["images"] == 2
    finally:
        stop_server(server)


def test_a_read_only_store_hands_images_over_inline_and_recovers(tiny_weights: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "mounted"
    with tmpfs(store_dir, "size=4m"):
        server = start_server(
            tiny_weights, tmp_path, "--store-dir", str(store_dir), env={"FLUXD_STORE_SWEEP_INTERVAL_S": "0.5"}
        )
        try:
            before = url_of(server)
            remount(store_dir, "ro")
            response = generate(server)
            assert "Read-only file system" in response.headers["x-fluxd-store-error"]
            [item] = response.json()["data"]
            assert "url" not in item and base64.b64decode(item["b64_json"]).startswith(PNG_MAGIC)
            assert store_health(server)["writable"] is False
            assert HTTP.get(before).status_code == 200  # what was stored is still served
            remount(store_dir, "rw")
            wait_until(lambda: store_health(server)["writable"])  # the sweeper tries again
            assert "url" in generate(server).json()["data"][0]
        finally:
            stop_server(server)


def test_a_full_disk_hands_images_over_inline_until_expired_ones_make_room(
    tiny_weights: Path, tmp_path: Path
) -> None:
    store_dir = tmp_path / "mounted"
    with tmpfs(store_dir, "size=64k"):
        filler = os.urandom(40 * 1024)
        (store_dir / "someone-elses.bin").write_bytes(filler)
        server = start_server(
            tiny_weights,
            tmp_path,
            *("--store-dir", str(store_dir), "--image-ttl", "3"),
            # No sweep in this test's time: only the write itself can make room.
            env={"FLUXD_STORE_SWEEP_INTERVAL_S": "3600"},
        )
        try:
            stored: list[str] = []
            for seed in range(8):  # 24 kB free: two 10 kB images fit
                response = generate(server, seed)
                [item] = response.json()["data"]
                if "url" not in item:
                    break
                stored.append(item["url"])
            else:
                pytest.fail("the disk never filled")
            assert stored, "the disk was full before any image"
            assert "No space left on device" in response.headers["x-fluxd-store-error"]
            assert base64.b64decode(item["b64_json"]).startswith(PNG_MAGIC)
            wait_until(lambda: all(HTTP.get(url).status_code == 404 for url in stored))  # their TTL
            assert "url" in generate(server).json()["data"][0]  # expired files went before the write
            assert store_health(server)["writable"] is True
        finally:
            stop_server(server)
        assert (store_dir / "someone-elses.bin").read_bytes() == filler
