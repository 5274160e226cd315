"""GET /v1/files/images/{id}.{ext}: stored images behind `response_format=url` until their TTL passes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from server.encode import CONTENT_TYPES
from server.errors import APIError

router = APIRouter(prefix="/v1/files/images", tags=["files"])


@router.get("/{name}", operation_id="get_image")
@router.head("/{name}", operation_id="head_image")
async def get_image(name: str, request: Request) -> FileResponse:
    """A generated image as `<id>.<ext>` (the URL fluxd gave) or `<id>`; unknown or expired ids are 404."""
    image_id, _, extension = name.partition(".")
    stored = request.app.state.store.get(image_id, CONTENT_TYPES)
    if stored is None or extension not in ("", stored.path.suffix.lstrip(".")):
        raise APIError("image_not_found", "No such image, or it has expired.", "name")
    return FileResponse(
        stored.path, media_type=stored.content_type, headers={"Cache-Control": "private, max-age=3600"}
    )
