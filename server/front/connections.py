"""uvicorn's HTTP protocol with a deadline on the request head.

uvicorn closes a keep-alive connection idle between requests, but not one that never sends a request, nor one
that sends its headers a byte at a time: either holds a connection (and a file descriptor) for ever. Here the
head of every request, from the connection's start or the request's first byte, must arrive within
`head_timeout_s`.
"""

from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def guarded_protocol(head_timeout_s: float) -> type[HttpToolsProtocol]:
    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_deadline: TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._head_deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_deadline = self.loop.call_later(head_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _expire(self) -> None:
            self._head_deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """Connection limits and timeouts from the settings, as uvicorn.Config keywords. X-Forwarded-* headers are
    read by fluxd itself (server.front.service.public_base), from --forwarded-allow-ips only."""
    return {
        "http": guarded_protocol(settings.request_head_timeout_s),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_connections,
        "proxy_headers": False,
    }
