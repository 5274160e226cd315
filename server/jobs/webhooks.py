"""Webhooks as the Standard Webhooks spec signs them, sent only to operator-listed URLs, retried with backoff.

Signature: `webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">` with the
key the `whsec_<base64>` secret encodes; `webhook-id` stays the same across retries, so a receiver can
de-duplicate an at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import httpx

from pipelines.contract.errors import InvalidParameter
from server.declarations.webhook_targets import allow_list, canonical, masked, secret_key, within

logger = logging.getLogger(__name__)

# Seconds before each retry: about two hours in all, as receivers go down for a deploy or a reboot.
RETRY_DELAYS_S = (1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0)
TRY_TIMEOUT_S = 15.0
TryListener = Callable[[int, int | None, float | None], Awaitable[None]]


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one try."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class Webhooks:
    """Checks webhook URLs against the allow-list and delivers signed POSTs."""

    def __init__(self, allow: Sequence[str], secret: str | None) -> None:
        self.allow = allow_list(allow)
        self.key = secret_key(secret) if secret else None

    def allowed(self, url: str) -> str | None:
        """The normalised URL, which is the one compared and the one sent; None when no prefix admits it."""
        parts = canonical(url)
        if parts is None or not any(within(parts, prefix) for prefix in self.allow):
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
