"""POST /v1/images/generations, /edits, /variations: thin routes over the ImageService."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipelines.contract.errors import InvalidParameter
from server.declarations.errors import validation_error
from server.declarations.job_protocol import ImageJob
from server.declarations.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    _ImageFields,
)
from server.front.service import ClientGone, ImageService, Prepared, public_base
from server.jobs.headers import wait_s, wants_async
from server.jobs.service import JobService, owner_of

router = APIRouter(prefix="/v1/images", tags=["images"])

MAX_FILES = 16
LORA_FORM_FIELDS = {"loras[][path]": "path", "loras[][scale]": "scale"}
CLIENT_CLOSED = 499  # nginx's status for a client that went away; nobody reads it, the log does
ASYNC_ANSWER: dict[int | str, dict] = {
    202: {"model": ImageJob, "description": "Sent with `Prefer: respond-async`: the job to poll at Location"}
}


def _service(request: Request) -> ImageService:
    return request.app.state.images


async def _answer(
    request: Request, response: Response, prepared: Prepared, kind: str
) -> Response | ImagesResponse:
    service = _service(request)
    if prepared.reply.stream:
        return StreamingResponse(service.stream(request, prepared, kind), media_type="text/event-stream")
    try:
        result = await service.run(request, prepared)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return await service.respond(public_base(request, service.settings), prepared, result, response.headers)


async def _submit(
    request: Request, body: _ImageFields, images: list[bytes] | None, prompt_required: bool
) -> JSONResponse:
    """A 202 and the job to poll; with `Prefer: wait=N`, the images (200) if the job succeeds within N s."""
    jobs: JobService = request.app.state.jobs
    wait = wait_s(request)
    job, new = await jobs.submit(request, body, request.url.path, images, prompt_required)
    if wait:
        job = await jobs.wait(job.id, owner_of(request), wait)
    headers = {"Location": f"/v1/images/jobs/{job.id}", **({} if new else {"Idempotent-Replayed": "true"})}
    if wait is not None and job.result is not None:
        return JSONResponse(
            job.result.model_dump(mode="json", exclude_none=True),
            headers={"Preference-Applied": f"wait={wait}", **headers},
        )
    applied = "respond-async" if wait is None else f"respond-async, wait={wait}"
    return JSONResponse(
        job.model_dump(mode="json", exclude_none=True),
        status_code=202,
        headers={"Preference-Applied": applied, **headers},
    )


async def _handle(
    request: Request,
    response: Response,
    body: _ImageFields,
    kind: str,
    images: list[bytes] | None = None,
    prompt_required: bool = True,
) -> Response | ImagesResponse:
    """With `Prefer: respond-async`, a 202 and the job to poll; without, the images as before."""
    if wants_async(request):
        return await _submit(request, body, images, prompt_required)
    for field in ("webhook_url", "webhook_events", "job_ttl_s"):
        if getattr(body, field) is not None:
            raise InvalidParameter(
                field, f"{field} is for async jobs: send the request with the header Prefer: respond-async."
            )
    service = _service(request)
    prepared = await service.prepare(body, images, prompt_required, public_base(request, service.settings))
    return await _answer(request, response, prepared, kind)


@router.post(
    "/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses=ASYNC_ANSWER
)
async def create_image(
    body: ImageGenerationRequest, request: Request, response: Response
) -> Response | ImagesResponse:
    """Create images from a prompt (OpenAI `images.generate`), with the gateways' extra parameters."""
    return await _handle(request, response, body, "image_generation")


async def _read_edit_form(request: Request) -> tuple[ImageEditRequest, list[bytes]]:
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=256)
    except StarletteHTTPException as exc:
        # Starlette stops at the file limit before any part is looked at; the only files fluxd reads are
        # references, so too many of them is a bad `image` (its message is the one thing that says so).
        if not str(exc.detail).startswith("Too many files"):
            raise
        raise InvalidParameter(
            "image",
            f"Too many files: at most {MAX_FILES} are read from one request, more images than any model "
            "takes (limits.max_reference_images in /v1/models).",
        ) from None
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    loras: list[dict[str, str]] = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in ("image", "image[]"):
                images.append(await value.read())
            elif key == "mask":
                if "mask" in fields:
                    raise InvalidParameter("mask", "Send one mask: it applies to the first image.")
                fields["mask"] = await value.read()
            else:
                raise InvalidParameter(key, f"Unexpected file field '{key}'.", "unknown_parameter")
        elif key == "mask":
            raise InvalidParameter("mask", "'mask' must be sent as a file (a PNG of the first image's size).")
        elif key in LORA_FORM_FIELDS:
            # The SDK flattens extra_body={"loras": [...]} to loras[][path], loras[][scale] per entry, in
            # order: a name the last entry already has opens the next one.
            if not loras or LORA_FORM_FIELDS[key] in loras[-1]:
                loras.append({})
            loras[-1][LORA_FORM_FIELDS[key]] = value
        elif key in fields:
            raise InvalidParameter(key, f"'{key}' was sent more than once; only 'image' repeats.")
        else:
            fields[key] = value
    if not images:
        raise InvalidParameter("image", "Missing required parameter: 'image'.", "missing_required_parameter")
    if loras:
        if "loras" in fields:
            raise InvalidParameter("loras", "Send loras once: as a JSON field or as loras[][path] fields.")
        fields["loras"] = loras
    fields.setdefault("prompt", "")  # a missing prompt is refused with an empty one, by build_request
    try:
        return ImageEditRequest.model_validate(fields), images
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


@router.post(
    "/edits", response_model=ImagesResponse, response_model_exclude_none=True, responses=ASYNC_ANSWER
)
async def edit_image(request: Request, response: Response) -> Response | ImagesResponse:
    """Edit or compose from 1-4 reference images (multipart: `image`, `image[]`), OpenAI `images.edit`; with
    a `mask` file, repaint the first image inside it and keep the rest as sent."""
    body, images = await _read_edit_form(request)
    return await _handle(request, response, body, "image_edit", images)


@router.post(
    "/variations", response_model=ImagesResponse, response_model_exclude_none=True, responses=ASYNC_ANSWER
)
async def create_variation(request: Request, response: Response) -> Response | ImagesResponse:
    """Variations (legacy): an edit with an empty instruction on the default model (`--default-model`)."""
    body, images = await _read_edit_form(request)
    if body.prompt:
        raise InvalidParameter(
            "prompt", "Variations take no prompt; use /v1/images/edits.", "unknown_parameter"
        )
    if len(images) > 1:
        raise InvalidParameter("image", "Variations take one image; use /v1/images/edits for several.")
    if body.mask is not None:
        raise InvalidParameter("mask", "Variations take no mask; use /v1/images/edits to inpaint.")
    return await _handle(request, response, body, "image_edit", images, prompt_required=False)
