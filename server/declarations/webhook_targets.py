"""Where webhooks may go and what signs them, as the settings declare them: the `whsec_<base64>` secret's key,
and `--webhook-allow`'s prefixes with the URL normalisation (RFC 3986 section 6.2.2) that every webhook URL
passes before it is compared with them. Delivery is server/jobs/webhooks.py's.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

import httpx

SECRET_PREFIX = "whsec_"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CREDENTIALS = re.compile(r"(//)[^/?#]*@")


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


def within(url: SplitResult, prefix: SplitResult) -> bool:
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
