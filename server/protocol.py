"""Pydantic models of the OpenAI Images API as the official SDKs send and parse it, plus the seeds' fields.

Fields follow the OpenAI spec's order; the seeds' extra parameters (hosted gateways' names) come after.
`None` everywhere means "use the default", because the SDKs send Python None as JSON null.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 32_000

OutputFormat = Literal["png", "jpeg", "webp", "avif", "gif"]
Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
Background = Literal["transparent", "opaque", "auto"]
Text = Annotated[str, Field(min_length=1)]  # "" is neither a value nor "use the default": that is null


class _ImageFields(BaseModel):
    """Fields shared by generations and edits; unknown fields are kept for passthrough or a 400."""

    model_config = ConfigDict(extra="allow")

    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
    model: Text | None = None
    n: Annotated[int, Field(ge=1, le=10)] | None = None
    size: Text | None = None
    quality: Quality | None = None
    background: Background | None = None
    output_format: OutputFormat | None = None
    output_compression: Annotated[int, Field(ge=0, le=100)] | None = None
    partial_images: Annotated[int, Field(ge=0, le=3)] | None = None
    stream: bool | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    # The seeds' parameters.
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    aspect_ratio: Text | None = None
    resolution: Text | None = None
    resolution_mode: Literal["auto", "match_input"] | None = None
    width: Annotated[int, Field(ge=1, le=14142)] | None = None
    height: Annotated[int, Field(ge=1, le=14142)] | None = None
    cfg_scale: float | None = None
    num_inference_steps: int | None = None
    output_quality: Annotated[int, Field(ge=0, le=100)] | None = None
    sync_mode: bool | None = None
    prompt_enhancement: Literal["off", "on"] | bool | None = None
    enhance_prompt: bool | None = None
    enable_prompt_expansion: bool | None = None
    prompt_upsampling: bool | None = None
    acceleration: Literal["none", "regular", "high"] | None = None
    go_fast: bool | None = None
    enable_safety_checker: bool | None = None
    disable_safety_checker: bool | None = None
    safety_tolerance: Annotated[int, Field(ge=1, le=6)] | None = None
    # fluxd's own: a URL POSTed when an async job (Prefer: respond-async) ends; server/job_service.py.
    webhook_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None


class ImageGenerationRequest(_ImageFields):
    """Body of POST /v1/images/generations. JSON carries types, so none is converted: `"n": true` or
    `"stream": "yes"` is a 400, not 1 image or a stream. Multipart edits arrive as text and are parsed."""

    model_config = ConfigDict(extra="allow", strict=True)

    moderation: Literal["low", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None


class ImageEditRequest(_ImageFields):
    """Text fields of POST /v1/images/edits (the files are handled apart)."""

    input_fidelity: Literal["low", "high"] | None = None


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int


class InputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class ImagesResponse(BaseModel):
    """The SDK's ImagesResponse; echo fields are left out where the SDK's types would not know the value."""

    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"] | None = None
    output_format: Literal["png", "webp", "jpeg", "gif"] | None = None
    quality: Literal["low", "medium", "high"] | None = None
    size: str | None = None
    usage: Usage | None = None
    model: str | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    model_config = ConfigDict(extra="allow")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# Async jobs (`Prefer: respond-async`): fluxd's own objects, shaped after BFL's and fal's queue answers.
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobProgress(BaseModel):
    step: int
    steps: int


class JobPreview(BaseModel):
    """The latest partial image of a running job that asked for `partial_images`."""

    b64_json: str
    partial_image_index: int
    output_format: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ImageJob(BaseModel):
    """An async image request; `result` is the usual ImagesResponse once it succeeded, `error` the usual
    error envelope's body once it failed."""

    id: str
    object: Literal["image.job"] = "image.job"
    status: JobStatus
    created: int
    model: str
    endpoint: str
    position: int | None = None
    progress: JobProgress | None = None
    preview: JobPreview | None = None
    result: ImagesResponse | None = None
    error: ErrorBody | None = None
    finished: int | None = None
    expires: int | None = None


class ImageJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageJob]
