"""Webhooks as the Standard Webhooks spec signs them, sent only to operator-listed URLs, retried with backoff.

Signature: `webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` with the
key the `whsec_<base64>` secret encodes; `webhook-id` stays the same across retries, so a receiver can
de-duplicate an at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import string
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import SplitResult, urlsplit

import httpx

from pipelines.errors import InvalidParameter

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
# Seconds before each retry: about two hours in all, as receivers go down for a deploy or a reboot.
RETRY_DELAYS_S = (1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
TRY_TIMEOUT_S = 15.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CREDENTIALS = re.compile(r"(//)[^/?#]*@")
TryListener = Callable[[int, int | None, float | None], Awaitable[None]]


def secret_key(secret: str) -> bytes:
    """The HMAC key a `whsec_<base64>` secret encodes (the prefix is optional, as in the spec's libraries)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError(
            "a webhook secret encodes at least 16 bytes (e.g. whsec_ + base64 of 32 random bytes)"
        )
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one try."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_PATH_CHARS = _UNRESERVED | frozenset("!$&'()*+,;=:@/")  # RFC 3986 pchar and '/'
_QUERY_CHARS = _PATH_CHARS | frozenset("?")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})|(%)|(.)", re.DOTALL)
# Escapes a receiving server may decode into a separator: an encoded '/' or '\\' could climb back out of a
# prefix after the comparison, so a URL holding one is refused.
_SEPARATORS = ("%2F", "%5C")


def _normal_escapes(text: str, allowed: frozenset[str]) -> str | None:
    """RFC 3986 6.2.2: unreserved characters decoded, other escapes in upper case, every character that may
    not stand bare percent-encoded (UTF-8); None for a '%' that starts no escape."""
    out = []
    for escape, bare_percent, char in _ESCAPE.findall(text):
        if bare_percent:
            return None
        if escape:
            decoded = chr(int(escape, 16))
            out.append(decoded if decoded in _UNRESERVED else f"%{escape.upper()}")
        elif char in allowed:
            out.append(char)
        else:
            out.append("".join(f"%{byte:02X}" for byte in char.encode()))
    return "".join(out)


def _without_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path: '.' and '..' segments resolved, never above the root."""
    segments: list[str] = []
    parts = path.split("/")[1:]
    for index, segment in enumerate(parts):
        last = index == len(parts) - 1
        if segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif segment == ".":
            if last:
                segments.append("")
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def canonical(url: str) -> SplitResult | None:
    """`url` normalised as RFC 3986 says (case of scheme and host, default port, escapes, dot segments), as
    httpx will send it; None unless it is an http(s) URL with a host, no credentials and nothing a server
    could read as another path."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme.lower() not in _DEFAULT_PORTS or not host or parts.username is not None:
        return None
    if "\\" in url or not url.isprintable() or not host.isascii() or " " in url:
        return None
    path = _normal_escapes(parts.path or "/", _PATH_CHARS)
    query = _normal_escapes(parts.query, _QUERY_CHARS)
    if path is None or query is None or any(sep in path for sep in _SEPARATORS):
        return None
    scheme = parts.scheme.lower()
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    normal = SplitResult(scheme, netloc, _without_dot_segments(path), query, "")
    # The comparison holds only for the URL that is sent: one httpx would send otherwise is refused.
    if str(httpx.URL(normal.geturl())) != normal.geturl():
        return None
    return normal


def _port(parts: SplitResult) -> int:
    return parts.port or _DEFAULT_PORTS[parts.scheme]


def _within(url: SplitResult, prefix: SplitResult) -> bool:
    """Same scheme, host and port, and a path under the prefix's path, cut at a '/' (so /hooks does not
    admit /hooks-evil). Compared parsed, never as text: 'http://lan.box' must not admit 'http://lan.box.evil'."""
    if (url.scheme, url.hostname, _port(url)) != (prefix.scheme, prefix.hostname, _port(prefix)):
        return False
    base = prefix.path.rstrip("/")
    return not base or url.path == base or url.path.startswith(base + "/")


def masked(url: str) -> str:
    """`url` with the credentials of its authority, if any, replaced by '***', fit to print."""
    return _CREDENTIALS.sub(r"\1***@", url)


def allow_list(entries: Sequence[str]) -> list[SplitResult]:
    """The operator's `--webhook-allow` prefixes, normalised; a ValueError names a bad one, credentials
    masked."""
    prefixes = []
    for entry in entries:
        parts = canonical(entry)
        if parts is None:
            raise ValueError(
                f"entry {masked(entry)!r} is not an http(s) URL without credentials, e.g. https://hooks.lan/fluxd"
            )
        prefixes.append(parts)
    return prefixes


class Webhooks:
    """Checks webhook URLs against the allow-list and delivers signed POSTs."""

    def __init__(self, allow: Sequence[str], secret: str | None) -> None:
        self.allow = allow_list(allow)
        self.key = secret_key(secret) if secret else None

    def allowed(self, url: str) -> str | None:
        """The normalised URL, which is the one compared and the one sent; None when no prefix admits it."""
        parts = canonical(url)
        if parts is None or not any(_within(parts, prefix) for prefix in self.allow):
            return None
        return parts.geturl()

    def check(self, url: str) -> str:
        """The URL to store and send (normalised), or a 400 naming webhook_url unless the URL is under one of
        the operator's prefixes."""
        if not self.allow or self.key is None:
            raise InvalidParameter(
                "webhook_url",
                "This server sends no webhooks: its operator allows no webhook URLs (--webhook-allow).",
            )
        target = self.allowed(url)
        if target is None:
            raise InvalidParameter(
                "webhook_url",
                "webhook_url is not under any URL this server's operator allows (--webhook-allow), once "
                "normalised (RFC 3986: dot segments resolved, escapes decoded; an escaped '/' or '\\' is "
                "refused).",
            )
        return target

    def headers(self, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        assert self.key is not None  # check() refused every webhook_url without a key
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.key, message_id, timestamp, body),
        }

    async def deliver(
        self, message_id: str, url: str, body: bytes, on_try: TryListener | None = None
    ) -> bool:
        """POST until a 2xx answers or the retries run out; every try is logged, and told to `on_try` (tries
        so far, the HTTP status or None for no answer, when the next try goes or None). Each try is signed
        anew, as its timestamp is new. Redirects are not followed: one could lead off the allow-list."""
        target = self.allowed(url)
        if target is None:  # stored before a restart with another --webhook-allow, or before normalisation
            logger.error("webhook %s not sent: %s is not under --webhook-allow", message_id, masked(url))
            return False
        url = target
        delays = (0.0, *RETRY_DELAYS_S)
        async with httpx.AsyncClient(timeout=TRY_TIMEOUT_S, follow_redirects=False) as client:
            for attempt, delay in enumerate(delays, start=1):
                await asyncio.sleep(delay)
                status: int | None = None
                try:
                    answer = await client.post(url, content=body, headers=self.headers(message_id, body))
                except httpx.HTTPError as exc:
                    outcome = f"failed: {type(exc).__name__} {exc}"
                else:
                    status = answer.status_code
                    if answer.is_success:
                        logger.info("webhook %s try %d to %s: %d", message_id, attempt, url, status)
                        if on_try is not None:
                            await on_try(attempt, status, None)
                        return True
                    outcome = f"answered {status}"
                logger.warning("webhook %s try %d to %s %s", message_id, attempt, url, outcome)
                if on_try is not None:
                    later = delays[attempt] if attempt < len(delays) else None
                    await on_try(attempt, status, None if later is None else time.time() + later)
        logger.error("webhook %s to %s not delivered after %d tries", message_id, url, attempt)
        return False
