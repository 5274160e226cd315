"""The async jobs' answers (`Prefer: respond-async`): the job object GET, POST and webhooks carry, its
progress, preview and webhook deliveries, a page of jobs and a deletion. A job's result is an ImagesResponse
(server/declarations/protocol.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, SerializationInfo, SerializerFunctionWrapHandler, model_serializer

from server.declarations.protocol import ErrorBody, ImagesResponse

# Async jobs (`Prefer: respond-async`): fluxd's own objects, shaped after BFL's and fal's queue answers.
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "expired"]


class JobProgress(BaseModel):
    step: int
    steps: int


class JobPreview(BaseModel):
    """The latest partial image of a running job that asked for `partial_images`."""

    b64_json: str
    partial_image_index: int
    output_format: str


class JobWebhook(BaseModel):
    """One event's webhook delivery: its tries so far, the last HTTP status (null: no answer), the next
    try."""

    type: str
    state: Literal["pending", "delivered", "failed"]
    tries: int
    last_status: int | None = None
    next_try_at: int | None = None


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
    expires_at: int | None = None  # once it ended: when it and its result go (a DELETE takes them sooner)
    webhooks: list[JobWebhook] | None = None

    @model_serializer(mode="wrap")
    def _always_expires_at(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        """Answers are dumped without their empty fields, but `expires_at` is on every job, null until it
        ends, as on OpenAI's video jobs: a client can read it without checking that it is there."""
        data = handler(self)
        if isinstance(data, dict) and info.include is None and info.exclude is None:
            data.setdefault("expires_at", self.expires_at)
        return data


class ImageJobDeleted(BaseModel):
    """The answer to DELETE of an ended job, as OpenAI's deletions answer."""

    id: str
    object: Literal["image.job.deleted"] = "image.job.deleted"
    deleted: Literal[True] = True


class ImageJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ImageJob]
