"""The one error path: every failure leaves as {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.errors import InvalidParameter, ModelNotFound

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI envelope fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def busy(message: str, retry_after_s: float, status: int = 429) -> APIError:
    # The Python SDK waits at most 120 s between retries and gives up on longer waits.
    seconds = max(1, min(120, round(retry_after_s)))
    return APIError(
        status,
        message,
        "rate_limit_exceeded" if status == 429 else "server_error",
        code="rate_limit_exceeded" if status == 429 else "server_busy",
        headers={"Retry-After": str(seconds), "x-should-retry": "true"},
    )


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidParameter):
        return APIError(400, exc.message, param=exc.param, code=exc.code, headers={"x-should-retry": "false"})
    if isinstance(exc, ModelNotFound):
        return APIError(
            404, exc.message, param="model", code="model_not_found", headers={"x-should-retry": "false"}
        )
    return APIError(
        500, "The server had an error while processing your request.", "server_error", code="server_error"
    )


def error_response(error: APIError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    headers = {**error.headers, "x-error-code": error.code or error.type}
    return JSONResponse(body, status_code=error.status, headers=headers)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """Pydantic's first error as a 400 naming the field: for JSON bodies and multipart forms alike."""
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    # ("body", "field", ...): every field is top-level; what follows it names a union member, not a field.
    location = [part for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = str(location[0]) if location and kind != "json_invalid" else None
    if kind == "json_invalid":
        error = first.get("ctx", {}).get("error", "")
        message, code = (
            f"The request body is not valid JSON ({error} at character {location[0]}).",
            "invalid_json",
        )
    elif kind == "extra_forbidden":
        message, code = f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    elif kind == "missing" and param is None:
        message, code = (
            "The request has no body: send a JSON object with a 'prompt'.",
            "missing_required_parameter",
        )
    elif kind == "missing":
        message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
    else:
        detail = first.get("msg", "Invalid request.")
        message, code = (f"Invalid value for '{param}': {detail}" if param else detail), "invalid_value"
    return APIError(400, message, param=param, code=code, headers={"x-should-retry": "false"})


def body_too_large(max_body: int) -> APIError:
    return APIError(
        413,
        f"Request body is larger than {max_body / 2**20:g} MB.",
        param="body",
        code="request_too_large",
        headers={"x-should-retry": "false"},
    )


class BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read, past the limit: an HTTPException, because FastAPI turns any other
    exception raised while it reads a JSON body into a generic 400."""

    def __init__(self, max_body: int) -> None:
        super().__init__(413)
        self.error = body_too_large(max_body)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return error_response(exc.error)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind, headers=exc.headers))

    async def _known(_request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    # Registered one by one: Starlette re-raises what the catch-all Exception handler answers (a log line
    # with a traceback per 400), so expected errors must never reach it.
    for known in (APIError, InvalidParameter, ModelNotFound):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        error = to_api_error(exc)
        if error.status >= 500 and not isinstance(exc, APIError):
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(error)
