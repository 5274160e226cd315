"""Remote inputs: the one place fluxd GETs a URL that a request names, and only under the operator's
`--fetch-allow` prefixes.

The URL, and every redirect it leads to, is normalised as webhook URLs are (RFC 3986 6.2.2: case, default
port, escapes, dot segments; credentials refused) and compared with the prefixes parsed, so that
`http://allowed.example@evil/` or `/allowed/../elsewhere` is off the list. The body is streamed under a size
cap and an overall deadline. Every failure is a 400 naming the request's field; a URL is shown without its
credentials, query or fragment, where tokens travel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from pipelines.contract.errors import InvalidParameter
from pipelines.contract.lora_catalog import FOLDER, SUFFIX
from pipelines.contract.lora_catalog import PARAM as LORAS
from pipelines.contract.safetensors_header import HeaderError, read_header
from server.declarations.errors import APIError
from server.declarations.settings import Settings
from server.declarations.webhook_targets import allow_list, canonical, within

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CACHE = ".cache"  # weights/loras/.cache/<sha256 of the normalised URL>.safetensors
SCHEMES = ("http://", "https://")


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(SCHEMES)


def shown(url: str) -> str:
    """`url` fit for a message: scheme, host, port and path only."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the URL"
    host = parts.hostname
    if not host:
        return "the URL"
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}{parts.path}"


def _allowed(url: str, field: str, prefixes: list[SplitResult], came_from: str | None = None) -> str:
    """The normalised URL, the one compared and the one sent; a 400 naming `field` unless a prefix admits
    it."""
    parts = canonical(url)
    if parts is not None and any(within(parts, prefix) for prefix in prefixes):
        return parts.geturl()
    via = f" (a redirect from {shown(came_from)})" if came_from else ""
    raise InvalidParameter(
        field,
        f"'{field}': {shown(url)}{via} is not under any URL this server's operator allows (--fetch-allow), "
        "once normalised (RFC 3986: dot segments resolved, escapes decoded; credentials and an escaped '/' "
        "or '\\' are refused).",
    )


def _prefixes(field: str, settings: Settings) -> list[SplitResult]:
    if not settings.fetch_allow:
        raise InvalidParameter(
            field, f"'{field}' cannot be a URL here: this server's operator allows none (--fetch-allow)."
        )
    return allow_list(settings.fetch_allow)


def _stream(
    url: str, field: str, settings: Settings, sink: Callable[[bytes], object], max_bytes: int | None
) -> None:
    """Write the body at `url` to `sink` chunk by chunk, following redirects only while each stays allowed."""
    prefixes = _prefixes(field, settings)
    current = _allowed(url, field, prefixes)
    cap = (
        settings.fetch_max_mb * 2**20 if max_bytes is None else min(max_bytes, settings.fetch_max_mb * 2**20)
    )
    deadline = time.monotonic() + settings.fetch_timeout_s
    too_large = f"'{field}': {{}} is larger than {cap / 2**20:g} MiB, the most this server fetches for it."
    try:
        # trust_env off: no proxy, .netrc or certificate settings from the environment reach these requests.
        with httpx.Client(timeout=settings.fetch_timeout_s, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                with client.stream("GET", current) as response:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        current = _allowed(urljoin(current, location), field, prefixes, current)
                        continue
                    if response.status_code != 200:
                        raise InvalidParameter(
                            field, f"'{field}': {shown(current)} answered HTTP {response.status_code}."
                        )
                    if int(response.headers.get("content-length") or 0) > cap:
                        raise InvalidParameter(field, too_large.format(shown(current)))
                    received = 0
                    for chunk in response.iter_bytes():
                        received += len(chunk)
                        if received > cap:
                            raise InvalidParameter(field, too_large.format(shown(current)))
                        if time.monotonic() > deadline:
                            raise httpx.ReadTimeout("past the deadline")
                        sink(chunk)
                    return
    except InvalidParameter:
        raise
    except httpx.TimeoutException:
        raise InvalidParameter(
            field,
            f"'{field}': {shown(current)} took longer than {settings.fetch_timeout_s:g} s "
            "(--fetch-timeout-s).",
        ) from None
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a Content-Length that is no number
        raise InvalidParameter(
            field, f"'{field}': {shown(current)} could not be fetched ({type(exc).__name__})."
        ) from None
    raise InvalidParameter(field, f"'{field}': {shown(url)} redirects more than {MAX_REDIRECTS} times.")


def fetch_allowed(url: str, field: str, settings: Settings, max_bytes: int | None = None) -> bytes:
    """The body at `url` when `--fetch-allow` admits it and every redirect on the way, or a 400 naming
    `field`; at most `max_bytes` (an image's limit, say), never past --fetch-max-mb. Blocking: call it off the
    event loop."""
    body = bytearray()
    _stream(url, field, settings, body.extend, max_bytes)
    return bytes(body)


def fetch_lora(url: str, settings: Settings) -> tuple[str, Path]:
    """(the name messages show, the file) of a LoRA by URL, fetched once into the LoRA folder's cache and
    kept only when it is a valid safetensors file. Blocking: call it off the event loop."""
    target = _allowed(url, LORAS, _prefixes(LORAS, settings))
    name = shown(target)
    cached = settings.weights_dir / FOLDER / CACHE / f"{hashlib.sha256(target.encode()).hexdigest()}{SUFFIX}"
    if cached.is_file():
        return name, cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".part", delete=False) as part:
            partial = Path(part.name)
    except OSError as exc:
        raise _unkept(name, exc) from None
    try:
        with partial.open("wb") as file:
            _stream(target, LORAS, settings, file.write, None)
        read_header(partial)
        os.replace(partial, cached)  # concurrent fetches of one URL each write their own part; the last wins
        logger.info("fetched LoRA %s (%d bytes) into %s", name, cached.stat().st_size, cached.name)
    except HeaderError as exc:
        raise InvalidParameter(
            LORAS, f"LoRA {name}: the fetched file is not a valid safetensors file ({exc})."
        ) from None
    except OSError as exc:  # the request is sound: the server's disk is full or read-only
        raise _unkept(name, exc) from None
    finally:
        partial.unlink(missing_ok=True)
    return name, cached


def _unkept(name: str, exc: OSError) -> APIError:
    logger.error("LoRA %s could not be kept in the LoRA cache: %s", name, exc)
    # The reason without the path: the weights folder's place is the operator's, not the client's.
    return APIError(
        "storage_unavailable",
        f"LoRA {name} was fetched but this server cannot keep it ({exc.strerror or type(exc).__name__}); "
        "its operator must free or fix the LoRA folder.",
        "loras",
    )


def fetch_loras(paths: Iterable[str], settings: Settings) -> dict[str, tuple[str, Path]]:
    """The URLs among a request's `loras` paths, each fetched (or found in the cache): URL -> (name, file).
    build_request calls it once the count and scales have passed (lora_catalog.check_entries)."""
    urls = dict.fromkeys(path for path in paths if is_url(path))
    return {url: fetch_lora(url, settings) for url in urls}
