"""Images kept on local disk for `response_format=url`: unguessable ids, a TTL, a quota, oldest out first."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{22,64}$")


@dataclass(frozen=True)
class StoredImage:
    path: Path
    content_type: str


class ImageStore:
    """A flat folder of `<id>.<ext>` files; the file's mtime is its creation time."""

    def __init__(self, root: Path, ttl_s: float, quota_bytes: int) -> None:
        self.root = root
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, extension: str) -> str:
        image_id = secrets.token_urlsafe(24)  # 192 random bits
        with self._lock:
            (self.root / f"{image_id}.{extension}").write_bytes(data)
            self._evict()
        return image_id

    def get(self, image_id: str, content_types: dict[str, str]) -> StoredImage | None:
        if not _ID.match(image_id):
            return None
        for path in self.root.glob(f"{image_id}.*"):
            if time.time() - path.stat().st_mtime > self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            extension = path.suffix.lstrip(".")
            if extension in content_types:
                return StoredImage(path, content_types[extension])
        return None

    def _evict(self) -> None:
        now = time.time()
        files = sorted((p.stat().st_mtime, p.stat().st_size, p) for p in self.root.iterdir() if p.is_file())
        total = sum(size for _, size, _ in files)
        for mtime, size, path in files:
            if now - mtime > self.ttl_s or total > self.quota_bytes:
                path.unlink(missing_ok=True)
                total -= size
        if total > self.quota_bytes:
            logger.warning("image store over its quota after eviction: %d bytes", total)
