"""The url image store in-process: the image route answers from the in-memory index, and only the store's
own files are indexed. The app runs through httpx's ASGI transport, without its lifespan (no workers)."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.declarations.settings import Settings
from server.front.store import SUBFOLDER, ImageStore


def counting(calls: Counter, name: str, function: Callable, folder: Path) -> Callable:
    """`function`, counting its calls on `folder` or anything in it (pytest itself stats its own files)."""

    def spy(*args, **kwargs):
        if args and str(args[0]).startswith(str(folder)):
            calls[name] += 1
        return function(*args, **kwargs)

    return spy


def test_image_requests_list_and_stat_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(Settings(store_dir=tmp_path, weights_dir=tmp_path / "no-weights"))
    store: ImageStore = app.state.store
    store.open()
    ids = [store.put(b"x" * (100 + i), "png") for i in range(500)]
    calls: Counter = Counter()
    for name in ("scandir", "listdir", "stat", "lstat"):
        monkeypatch.setattr(os, name, counting(calls, name, getattr(os, name), tmp_path))
    for name in ("glob", "iterdir", "rglob"):
        monkeypatch.setattr(Path, name, counting(calls, f"Path.{name}", getattr(Path, name), tmp_path))

    async def requests() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fluxd") as http:
            return [
                await http.get(f"/v1/files/images/{ids[7]}.png"),
                await http.head(f"/v1/files/images/{ids[400]}"),
                await http.get(f"/v1/files/images/{secrets.token_urlsafe(24)}.png"),
                await http.get("/v1/files/images/not-an-id"),
            ]

    known, head, unknown, malformed = asyncio.run(requests())
    assert known.status_code == 200 and known.content == b"x" * 107
    assert known.headers["content-length"] == "107" and known.headers["content-type"] == "image/png"
    assert head.status_code == 200 and head.headers["content-length"] == "500"
    assert unknown.status_code == malformed.status_code == 404
    assert unknown.json()["error"]["code"] == "image_not_found"
    assert not calls, f"image requests touched the folder: {dict(calls)}"


def test_a_restart_indexes_only_what_the_store_wrote(tmp_path: Path) -> None:
    content_types = {"png": "image/png", "jpeg": "image/jpeg"}
    first = ImageStore(tmp_path, 600, 2**20, content_types)
    first.open()
    kept = first.put(b"png bytes", "png")
    folder = tmp_path / SUBFOLDER
    foreign_id = secrets.token_urlsafe(24)
    (folder / f"{foreign_id}.docx").write_bytes(b"not an image type the store writes")
    link_id = secrets.token_urlsafe(24)
    os.symlink("/etc/hostname", folder / f"{link_id}.png")
    (folder / "notes.png").write_bytes(b"a name the store never gives")

    second = ImageStore(tmp_path, 600, 2**20, content_types)
    second.open()
    restored = second.get(kept)
    assert restored is not None and restored.path.read_bytes() == b"png bytes"
    assert second.get(foreign_id) is None and second.get(link_id) is None
    assert second.health().images == 1 and second.health().bytes == len(b"png bytes")
