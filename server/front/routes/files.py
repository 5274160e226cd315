"""GET /v1/files/images/{id}.{ext}: stored images behind `response_format=url` until their TTL passes."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from server.declarations.errors import APIError

router = APIRouter(prefix="/v1/files/images", tags=["files"])


@router.get("/{name}", operation_id="get_image")
@router.head("/{name}", operation_id="head_image")
async def get_image(name: str, request: Request) -> FileResponse:
    """A generated image as `<id>.<ext>` (the URL fluxd gave) or `<id>`; unknown or expired ids are 404.
    Caches may keep it for the rest of its lifetime in the store."""
    image_id, _, extension = name.partition(".")
    stored = request.app.state.store.get(image_id)
    if stored is None or extension not in ("", stored.extension):
        raise APIError("image_not_found", "No such image, or it has expired.", "name")
    max_age = max(0, int(stored.expires - time.time()))
    return FileResponse(
        stored.path,
        media_type=stored.content_type,
        headers={"Cache-Control": f"private, max-age={max_age}"},
        stat_result=stored.stat_result(),  # from the index: a request costs no stat on the loop's behalf
    )
