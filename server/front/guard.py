"""Guard, the outer ASGI middleware every request passes: its request id, the API key check, the body-size
limit, the error counter, the answer to an unexpected exception, and its one log line."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import uuid

from fastapi import Request, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.declarations.errors import (
    APIError,
    BodyTooLarge,
    answer_unexpected,
    body_too_large,
    error_response,
)
from server.front.metrics import Metrics

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/docs", "/openapi.json", "/favicon.ico"})

# An image URL's 192-bit id is its capability: it must work in an <img> or another service without the key.
OPEN_PREFIXES = ("/v1/files/images/",)


class Guard:
    """Request ids, auth, body size, error counts and the one log line per request.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware hides client disconnects from the endpoint,
    and cancelling a job whose client went away depends on seeing them.
    """

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body: int, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        request.state.request_id = request_id
        started = time.perf_counter()
        status = 500

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                if status >= 400:
                    self.metrics.errors.labels(str(status), headers.get("x-error-code", "unknown")).inc()
            await send(message)

        received = 0

        async def receive_within_limit() -> Message:
            # Content-Length is checked before anything is read; a chunked body is counted as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        # Async jobs belong to a key: its hash, never the key, goes into the job table.
        request.state.caller = hashlib.sha256(_bearer(request)).hexdigest() if self.keys else ""
        refusal = _refuse(request, self.keys, self.max_body)
        try:
            await (refusal or self.app)(scope, receive_within_limit, send_with_id)
        except Exception as exc:
            if started_response:
                raise
            # Answered here rather than by an `Exception` handler, which Starlette re-raises after it
            # answers: uvicorn then drops the keep-alive connection the client is about to reuse.
            await answer_unexpected(exc, request.method, scope["path"])(scope, receive, send_with_id)
        job = getattr(request.state, "job", None)
        logger.info(
            "%s %s %s %d %.0fms%s",
            request_id,
            request.method,
            scope["path"],
            status,
            (time.perf_counter() - started) * 1000,
            f" {job}" if job else "",
        )


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _bearer(request: Request) -> bytes:
    header = request.headers.get("authorization", "")
    return header[7:].strip().encode() if header[:7].lower() == "bearer " else b""


def _refuse(request: Request, keys: list[bytes], max_body: int) -> Response | None:
    """Auth and body size, answered before any body is read."""
    if keys and not _open(request.url.path) and request.method != "OPTIONS":
        token = _bearer(request)
        # compare_digest against every key so the time taken does not reveal which key nearly matched.
        if not any([hmac.compare_digest(token, key) for key in keys]):
            message = (
                "Incorrect API key provided." if token else "Missing API key: send Authorization: Bearer KEY."
            )
            return error_response(APIError("invalid_api_key", message))
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        return error_response(body_too_large(max_body))
    return None
