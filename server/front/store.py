"""Images kept on local disk for `response_format=url`: unguessable ids, a TTL, a quota, oldest out first.

The store owns one subfolder, `<store_dir>/fluxd-images/`, and in it only the `<id>.<ext>` files it names
itself: whatever else lies there or beside it is never served, counted or deleted. An in-memory index,
built from that subfolder once at start-up (so urls outlive a restart until their TTL), answers lookups
without touching the disk. `open`, `put` and `sweep` do file I/O: call them in a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SUBFOLDER = "fluxd-images"
_ID_BYTES = 24  # 192 random bits, 32 url-safe characters
_NAME = re.compile(r"([A-Za-z0-9_-]{32})\.([a-z]+)")
_PROBE = ".fluxd-write-probe"


class StoreUnavailable(Exception):
    """An image could not be stored; the message says why, without paths, for the client."""


@dataclass(frozen=True)
class StoredImage:
    image_id: str
    path: Path
    extension: str
    content_type: str
    size: int
    created: float  # wall-clock seconds, also the file's mtime
    expires: float

    def stat_result(self) -> os.stat_result:
        """What a file response needs (size, mtime, a regular file), from the index instead of a stat."""
        return os.stat_result((stat.S_IFREG | 0o600, 0, 0, 1, 0, 0, self.size, *[self.created] * 3))


@dataclass(frozen=True)
class StoreHealth:
    writable: bool
    reason: str | None
    images: int
    bytes: int
    quota_bytes: int


class ImageStore:
    """`<id>.<ext>` files in the store's own subfolder, indexed in memory in creation order."""

    def __init__(
        self, store_dir: Path, ttl_s: float, quota_bytes: int, content_types: Mapping[str, str]
    ) -> None:
        self.root = store_dir / SUBFOLDER
        self.ttl_s = ttl_s
        self.quota_bytes = quota_bytes
        self.content_types = content_types
        self._index: dict[str, StoredImage] = {}  # insertion order is creation order: oldest first
        self._bytes = 0  # indexed files plus writes in flight
        self._failure: str | None = None  # why the last write failed, until one succeeds
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the subfolder and index the images an earlier run left in it; a folder that cannot be
        read or written leaves the store serving nothing new, with the reason in `health()`."""
        found: list[tuple[float, str, str, int]] = []
        foreign = 0
        try:
            self._make_root()
            with os.scandir(self.root) as entries:
                for entry in entries:
                    match = _NAME.fullmatch(entry.name)
                    # The store never writes links or other extensions: such entries are someone else's.
                    if match and match[2] in self.content_types and entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        found.append((info.st_mtime, match[1], match[2], info.st_size))
                    elif entry.name != _PROBE:
                        foreign += 1
        except OSError as exc:
            self._failed(exc)
            return
        found.sort()
        with self._lock:
            for created, image_id, extension, size in found:
                self._index[image_id] = self._entry(image_id, extension, size, created)
                self._bytes += size
        logger.info(
            "url store %s: %d images from an earlier run%s",
            self.root,
            len(found),
            f", {foreign} other entries left alone" if foreign else "",
        )
        self.sweep()
        self._probe()  # so that /ready reports a read-only folder before any request finds out

    def put(self, data: bytes, extension: str) -> str:
        """Store `data` and return its new id; expired (then oldest) images make room first.

        Raises StoreUnavailable when the image cannot be written (full disk, read-only folder, ...)."""
        size = len(data)
        if size > self.quota_bytes:
            raise StoreUnavailable(f"the image ({size} bytes) is larger than the store quota")
        image_id = secrets.token_urlsafe(_ID_BYTES)
        created = time.time()
        with self._lock:
            victims = self._take(size, created)
            self._bytes += size  # reserved, so concurrent writes do not overshoot the quota together
        self._delete(victims)
        entry = self._entry(image_id, extension, size, created)
        try:
            entry.path.write_bytes(data)
            os.utime(entry.path, (created, created))  # a restart reads the same creation time back
        except OSError as exc:
            with self._lock:
                self._bytes -= size
            _unlink(entry.path)
            raise StoreUnavailable(self._failed(exc)) from exc
        with self._lock:
            self._index[image_id] = entry
        self._recovered()
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        """The indexed image, unless its TTL has passed; no disk access."""
        with self._lock:
            entry = self._index.get(image_id)
        return entry if entry is not None and entry.expires > time.time() else None

    def remove(self, image_id: str) -> None:
        """Delete one image now (its job was deleted); its url answers 404 from here on."""
        with self._lock:
            entry = self._index.pop(image_id, None)
            if entry is not None:
                self._bytes -= entry.size
        if entry is not None:
            _unlink(entry.path)

    def sweep(self) -> None:
        """Delete expired images (and the oldest over the quota); re-check a store that failed to write."""
        with self._lock:
            victims = self._take(0, time.time())
        self._delete(victims)
        if self._failure is not None:
            self._probe()

    def health(self) -> StoreHealth:
        with self._lock:
            return StoreHealth(
                self._failure is None, self._failure, len(self._index), self._bytes, self.quota_bytes
            )

    def _entry(self, image_id: str, extension: str, size: int, created: float) -> StoredImage:
        return StoredImage(
            image_id,
            self.root / f"{image_id}.{extension}",
            extension,
            self.content_types[extension],
            size,
            created,
            created + self.ttl_s,
        )

    def _take(self, room: int, now: float) -> list[StoredImage]:
        """Under the lock: drop the expired images, then the oldest until `room` more bytes fit."""
        victims = []
        while self._index:
            oldest = next(iter(self._index.values()))
            if oldest.expires > now and self._bytes + room <= self.quota_bytes:
                break
            victims.append(self._index.pop(oldest.image_id))
            self._bytes -= oldest.size
        return victims

    def _delete(self, victims: list[StoredImage]) -> None:
        for victim in victims:
            _unlink(victim.path)

    def _make_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # something other than a folder has the store's name
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.root)) from exc

    def _probe(self) -> None:
        probe = self.root / _PROBE
        try:
            self._make_root()
            probe.write_bytes(b"\0")
        except OSError as exc:
            self._failed(exc)
        else:
            self._recovered()
        _unlink(probe)

    def _failed(self, exc: OSError) -> str:
        reason = f"cannot write to the url store: {exc.strerror or type(exc).__name__}"
        if reason != self._failure:
            logger.warning("url store %s: %s; url images come as b64_json until it writes", self.root, exc)
        self._failure = reason
        return reason

    def _recovered(self) -> None:
        if self._failure is not None:
            logger.info("url store %s writable", self.root)
        self._failure = None


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except NotADirectoryError:  # the subfolder's place is taken by a file: nothing of ours is there
        pass
    except OSError as exc:  # a read-only folder; the index no longer serves it either way
        logger.warning("could not delete %s: %s", path, exc)
