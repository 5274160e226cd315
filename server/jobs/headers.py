"""What an async job's request says beside its render: RFC 7240's Prefer (respond-async, wait=N), the
Idempotency-Key of the IETF draft Stripe's API follows and the fingerprint a key is checked against, and the
body fields only a job takes; and the url images a job's answer names."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

from fastapi import Request

from pipelines.contract.errors import InvalidParameter
from server.declarations.errors import APIError
from server.declarations.protocol import _ImageFields

MAX_WAIT_S = 600  # one held connection, as --queue-timeout bounds a synchronous one
_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # visible ASCII, as a header value carries it unquoted
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?")
MAX_CANCEL_AFTER_S = 7 * 86400
_URL_IMAGE = re.compile(r"/v1/files/images/([A-Za-z0-9_-]{32})\.[a-z]+$")


def preferences(http: Request) -> dict[str, str]:
    """The preferences of every Prefer header, names lower-cased, each with its value ('' when none)."""
    found: dict[str, str] = {}
    for header in http.headers.getlist("prefer"):
        for preference in header.split(","):
            name, _, value = preference.split(";")[0].partition("=")
            if name.strip():
                found.setdefault(name.strip().lower(), value.strip().strip('"'))
    return found


def wants_async(http: Request) -> bool:
    """RFC 7240: `respond-async` among the preferences of any Prefer header, case-insensitive."""
    return "respond-async" in preferences(http)


def wait_s(http: Request) -> int | None:
    """`wait=N` beside respond-async: the seconds to hold the answer before it goes async; None: no wait."""
    value = preferences(http).get("wait")
    if value is None:
        return None
    if not value.isdigit() or int(value) > MAX_WAIT_S:
        raise InvalidParameter("Prefer", f"Prefer: wait takes whole seconds from 0 to {MAX_WAIT_S}.")
    return int(value)


def cancel_after_s(http: Request) -> float | None:
    """Replicate's `Cancel-After`: seconds (`90`, `1.5`) or a duration (`45s`, `5m`, `1h30m`)."""
    value = http.headers.get("cancel-after")
    if value is None:
        return None
    found = _DURATION.fullmatch(value.strip())
    if found is None or not any(found.groups()):
        raise InvalidParameter("Cancel-After", "Cancel-After is seconds (90) or a duration (45s, 5m, 1h30m).")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in found.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if not 0 < total <= MAX_CANCEL_AFTER_S:
        raise InvalidParameter(
            "Cancel-After", f"Cancel-After is more than 0 s and at most {MAX_CANCEL_AFTER_S} s."
        )
    return total


def idempotency_key(http: Request) -> str | None:
    value = http.headers.get("idempotency-key")
    if value is not None and not _KEY.fullmatch(value):
        raise InvalidParameter(
            "Idempotency-Key", "Idempotency-Key is 1 to 255 visible ASCII characters, e.g. a UUID."
        )
    return value


def fingerprint(endpoint: str, body: _ImageFields, images: Sequence[bytes] | None) -> str:
    """SHA-256 of the request as parsed (so JSON key order or a multipart boundary do not count)."""
    digest = hashlib.sha256(endpoint.encode())
    digest.update(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode())
    for image in images or ():
        digest.update(hashlib.sha256(image).digest())
    return digest.hexdigest()


def check_replay(stored: str | None, asked: str | None) -> None:
    """The 422 for an Idempotency-Key sent again with another request."""
    if stored != asked:
        raise APIError(
            "idempotency_key_reused",
            "This Idempotency-Key was sent with another request; use a new key for a new request.",
            "Idempotency-Key",
        )


def check_job_fields(body: _ImageFields, max_ttl_s: float) -> None:
    if body.webhook_events is not None and body.webhook_url is None:
        raise InvalidParameter(
            "webhook_events", "webhook_events chooses the events sent to webhook_url: give both."
        )
    if body.stream:
        raise InvalidParameter(
            "stream", "stream=true and Prefer: respond-async ask for two different answers: choose one."
        )
    if body.job_ttl_s is not None and body.job_ttl_s > max_ttl_s:
        raise InvalidParameter(
            "job_ttl_s", f"job_ttl_s may shorten this server's retention of {max_ttl_s:g} s, not lengthen it."
        )


def url_images(result: str | None) -> list[str]:
    """The ids of the url store's images a stored ImagesResponse links to."""
    items = [] if result is None else json.loads(result).get("data", [])
    return [found[1] for item in items if (found := _URL_IMAGE.search(item.get("url") or "")) is not None]
