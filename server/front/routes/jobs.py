"""GET /v1/images/jobs[/{id}] and DELETE /v1/images/jobs/{id}: thin routes over the JobService."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from server.declarations.job_protocol import ImageJob, ImageJobDeleted, ImageJobList
from server.jobs.service import JobService, owner_of

router = APIRouter(prefix="/v1/images/jobs", tags=["jobs"])


def _jobs(request: Request) -> JobService:
    return request.app.state.jobs


@router.get("", response_model=ImageJobList, response_model_exclude_none=True)
async def list_jobs(request: Request, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> ImageJobList:
    """The caller's most recent jobs, newest first, without their results (GET each for its result)."""
    return ImageJobList(data=await _jobs(request).recent(owner_of(request), limit))


@router.get("/{job_id}", response_model=ImageJob, response_model_exclude_none=True)
async def get_job(job_id: str, request: Request) -> ImageJob:
    """Status, queue position, step progress, the latest preview; the ImagesResponse once it succeeded."""
    return await _jobs(request).get(job_id, owner_of(request))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The job's server-sent events"}},
)
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-sent events of the job: `status` (with the queue position), `progress` (step k of n), `preview`,
    then `done` with the job as GET answers it. Send `Last-Event-ID` to resume after the last event read."""
    events = await _jobs(request).feed(job_id, owner_of(request), request.headers.get("last-event-id"))
    return StreamingResponse(events, media_type="text/event-stream")


@router.delete("/{job_id}", response_model=ImageJob | ImageJobDeleted, response_model_exclude_none=True)
async def cancel_or_delete_job(job_id: str, request: Request) -> ImageJob | ImageJobDeleted:
    """Cancel a queued job (it never runs) or a running one (it stops at its next denoising step); delete an
    ended one, with its url images."""
    return await _jobs(request).cancel_or_delete(job_id, owner_of(request))
