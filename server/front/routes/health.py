"""GET /health (the process lives) and GET /ready (every worker has loaded and answered)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: 200 while the HTTP process runs."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 503 until every worker is up with its preloaded models.

    `store` reports the url image store; one that cannot write does not make the server unready, since
    every image is still answered (inline as `b64_json`, with an `x-fluxd-store-error` header). `jobs`
    reports the async job table the same way: one that cannot be used answers 503 on the job routes only."""
    pool = request.app.state.pool
    workers = [
        {
            "name": w.name,
            "ready": w.ready.is_set(),
            "restarts": w.restarts,
            "pid": w.pid,
            "busy_images": w.busy_images,
            "loaded": w.info.loaded if w.info else [],
        }
        for w in pool.workers
    ]
    ok = pool.all_ready()
    body: dict = {
        "status": "ready" if ok else "starting",
        "workers": workers,
        "store": asdict(request.app.state.store.health()),
        "jobs": asdict(request.app.state.jobs.health()),
    }
    replicas = getattr(pool, "replicas", None)  # a pool spread over a Ray cluster says which replicas served
    if replicas is not None:
        body["replicas"] = replicas()
    return JSONResponse(
        body,
        status_code=200 if ok else 503,
        headers=None if ok else {"x-error-code": "not_ready"},  # its label in fluxd_errors_total
    )
