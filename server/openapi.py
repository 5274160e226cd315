"""/openapi.json as the server really answers: the multipart bodies of edits and variations (read from the
form by hand, so FastAPI cannot see them) and the error statuses of server/errors.py, not FastAPI's 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.errors import KINDS
from server.protocol import ImageEditRequest

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
# Statuses every route may answer whatever it does (auth, body size, a fault) and those of the image routes.
_ANY_ROUTE = (401, 413, 500)
_IMAGE_ROUTES = (400, 404, 429, 503, 504)
_FORMS = ("/v1/images/edits", "/v1/images/variations")


def _edit_form() -> dict[str, Any]:
    schema = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"]["image"] = {
        "description": schema["properties"]["image"].get("description", ""),
        "oneOf": [binary, {"type": "array", "items": binary}],
    }
    schema["properties"]["image[]"] = {"type": "array", "items": binary, "description": "the SDKs' list form"}
    schema["properties"]["mask"] = {**binary, "description": schema["properties"]["mask"].get("description")}
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def _statuses(status: int) -> str:
    codes = sorted(code for code, kind in KINDS.items() if kind.status == status)
    return f"error codes: {', '.join(codes)}"


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                statuses = _ANY_ROUTE + (_IMAGE_ROUTES if path.startswith("/v1/images") else ())
                if path.startswith(("/v1/models/", "/v1/files/")):
                    statuses += (404,)
                if path.startswith("/v1/images/jobs/"):
                    statuses += (409,)  # cancelling a job that has ended
                for status in sorted(set(statuses)):
                    responses[str(status)] = {
                        "description": _statuses(status),
                        "content": {"application/json": {"schema": ERROR_SCHEMA}},
                    }
                if path in _FORMS:
                    operation["requestBody"] = _edit_form()
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
