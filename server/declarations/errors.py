"""The one error path and retry policy: every failure leaves as {"error": {message, type, param, code}}.

Each error code is declared once in KINDS with its HTTP status, its OpenAI `type`, whether a client should
retry (the SDKs read `x-should-retry`) and after how long (`Retry-After`). The JSON answer and the error
event inside a stream are both built by `envelope`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from pipelines.contract.errors import SERVER_ERROR, ErrorCode, FluxdError, InvalidParameter, ModelNotFound
from server.dispatch.pool import WorkerCrashed, WorkerFailure

logger = logging.getLogger(__name__)

# The Python SDK honours Retry-After of 0-120 s and does not retry at all above 120 s.
MAX_RETRY_AFTER_S = 120


@dataclass(frozen=True)
class ErrorKind:
    """How one error code is answered. `retry` None leaves the decision to the SDK's own rules."""

    status: int
    type: str = "invalid_request_error"
    retry: bool | None = False
    retry_after_s: float | None = None


KINDS: dict[ErrorCode, ErrorKind] = {
    # Bad input: a retry cannot fix it.
    "invalid_value": ErrorKind(400),
    "invalid_json": ErrorKind(400),
    "unknown_parameter": ErrorKind(400),
    "missing_required_parameter": ErrorKind(400),
    "invalid_api_key": ErrorKind(401),
    "model_not_found": ErrorKind(404),
    "image_not_found": ErrorKind(404, "not_found"),
    "job_not_found": ErrorKind(404, "not_found"),
    "job_finished": ErrorKind(409),
    "idempotency_key_reused": ErrorKind(422),  # the same Idempotency-Key with another request
    "not_found": ErrorKind(404, "not_found"),
    "method_not_allowed": ErrorKind(405),
    "request_too_large": ErrorKind(413),
    # Busy or briefly broken: retry, after a wait the server names.
    "rate_limit_exceeded": ErrorKind(429, "rate_limit_exceeded", True, 5),
    "worker_restarted": ErrorKind(503, "server_error", True, 1),
    "out_of_memory": ErrorKind(503, "server_error", True, 5),
    # A model this server cannot run, and a wait it was told to bound: retrying only repeats them (the SDK
    # would queue a timed-out request twice more, tripling the wait --queue-timeout bounds).
    "model_unavailable": ErrorKind(503, "server_error"),
    "jobs_unavailable": ErrorKind(503, "server_error"),  # a job table the disk cannot open or write
    "storage_unavailable": ErrorKind(503, "server_error"),  # a fetched file the disk cannot keep
    "queue_timeout": ErrorKind(504, "timeout"),
    "deadline_exceeded": ErrorKind(504, "timeout"),  # a job's Cancel-After passed
    "server_error": ErrorKind(500, "server_error", None),
    # An async job that took its worker or the server down on each of its tries: another would too.
    "job_crashed": ErrorKind(500, "server_error"),
    # A request whose client went away: nobody reads the answer (nginx's 499, "client closed request").
    "cancelled": ErrorKind(499, "server_error"),
}
_BY_STATUS: dict[int, ErrorCode] = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class APIError(Exception):
    """An error of a declared kind (`code`), with its message and the parameter it names."""

    def __init__(
        self, code: ErrorCode, message: str, param: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.kind = KINDS[code]
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s if retry_after_s is not None else self.kind.retry_after_s

    @property
    def status(self) -> int:
        return self.kind.status

    @property
    def type(self) -> str:
        return self.kind.type

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {"x-error-code": self.code}
        if self.kind.retry is not None:
            headers["x-should-retry"] = "true" if self.kind.retry else "false"
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, min(MAX_RETRY_AFTER_S, round(self.retry_after_s))))
        return headers


def to_api_error(exc: BaseException) -> APIError:
    """Any exception as the error a client sees; an unexpected one is a generic 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, FluxdError):
        return APIError(exc.code, exc.message, exc.param)
    if isinstance(exc, WorkerFailure):
        return APIError(exc.failure.code, exc.failure.message, exc.failure.param)
    if isinstance(exc, WorkerCrashed):
        return APIError(
            "worker_restarted", "The worker running this request crashed and is being restarted; retry."
        )
    return APIError("server_error", SERVER_ERROR)


def envelope(error: APIError) -> dict[str, Any]:
    """The OpenAI error body, for a JSON answer and for a stream's error event alike."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        envelope(error), status_code=error.status, headers={**error.headers(), **(headers or {})}
    )


def allowed_methods(request: Request) -> str:
    """The `Allow` header of a 405 (RFC 9110 15.5.6): each method some route of this path answers, asked of
    the routes themselves, so that two routes of one path (GET and DELETE of a job) are both named."""
    return ", ".join(
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.routes
        )
    )


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Pydantic's first error as a 400 naming the field: for JSON bodies and multipart forms alike."""
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    # ("body", "field", ...): every field is top-level; what follows it names a union member, not a field.
    location = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = str(location[0]) if location and kind != "json_invalid" else None
    if kind == "json_invalid":
        error = first.get("ctx", {}).get("error", "")
        return APIError(
            "invalid_json", f"The request body is not valid JSON ({error} at character {location[0]})."
        )
    if kind == "extra_forbidden":
        return APIError("unknown_parameter", f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing" and param is None:
        return APIError(
            "missing_required_parameter", "The request has no body: send a JSON object with a 'prompt'."
        )
    if kind == "missing":
        return APIError("missing_required_parameter", f"Missing required parameter: '{param}'.", param)
    detail = first.get("msg", "Invalid request.")
    return APIError("invalid_value", f"Invalid value for '{param}': {detail}" if param else detail, param)


def body_too_large(max_body: int) -> APIError:
    return APIError("request_too_large", f"Request body is larger than {max_body / 2**20:g} MB.", "body")


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read, past the limit: an HTTPException, because FastAPI turns any other
    exception raised while it reads a JSON body into a generic 400."""

    def __init__(self, max_body: int) -> None:
        super().__init__(413)
        self.error = body_too_large(max_body)


def install_error_handlers(app: FastAPI) -> None:
    """Handlers for the errors raised on purpose. There is deliberately no catch-all `Exception` handler:
    Starlette re-raises after one answers, which makes uvicorn drop the keep-alive connection; unexpected
    exceptions are answered by `answer_unexpected`, called from the outermost middleware."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return error_response(exc.error)
        code = _BY_STATUS.get(exc.status_code, "invalid_value")
        headers = {"Allow": allowed_methods(request)} if exc.status_code == 405 else None
        return error_response(APIError(code, str(exc.detail)), headers)

    async def _known(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    for known in (APIError, InvalidParameter, ModelNotFound):
        app.add_exception_handler(known, _known)


def answer_unexpected(exc: Exception, method: str, path: str) -> JSONResponse:
    """The generic 500 for an exception nothing else handled; its traceback stays in the log."""
    error = to_api_error(exc)
    if error.status >= 500:
        logger.error("unhandled error on %s %s", method, path, exc_info=exc)
    return error_response(error)
