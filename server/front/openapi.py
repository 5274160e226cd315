"""/openapi.json as the server really answers: the multipart bodies of edits and variations (read from the
form by hand, so FastAPI cannot see them) and the error statuses of server/declarations/errors.py, not
FastAPI's 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from server.declarations.errors import KINDS
from server.declarations.protocol import ImageEditRequest, StreamCompleted, StreamError, StreamPartialImage

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
_STREAMS = {"/v1/images/generations": "image_generation", "/v1/images/edits": "image_edit"}
_REF = "#/components/schemas/{model}"


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


def _event(name: str, model: type) -> dict[str, Any]:
    """One server-sent event: its `event:` name and its `data:` line, JSON of `model`."""
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"const": name},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": _REF.format(model=model.__name__)},
            },
        },
    }


def _stream(kind: str) -> dict[str, Any]:
    """The `stream: true` answer. OpenAPI 3.1 has no keyword for the items of a stream, so the events are
    described under `x-itemSchema`, the shape OpenAPI 3.2's `itemSchema` gives them."""
    return {
        "schema": {
            "type": "string",
            "description": f"Server-sent events with `stream: true`: up to `partial_images` "
            f"`{kind}.partial_image` events, then one `{kind}.completed`, or one `error` event if the render "
            "fails after the stream began.",
        },
        "x-itemSchema": {
            "oneOf": [
                _event(f"{kind}.partial_image", StreamPartialImage),
                _event(f"{kind}.completed", StreamCompleted),
                _event("error", StreamError),
            ]
        },
    }


def _stream_schemas() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(model, "serialization") for model in (StreamPartialImage, StreamCompleted, StreamError)],
        ref_template=_REF,
    )
    return schemas["$defs"]


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
                if path in _STREAMS:
                    responses["200"]["content"]["text/event-stream"] = _stream(_STREAMS[path])
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_stream_schemas())
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
