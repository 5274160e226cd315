"""`create_app(settings)`: the FastAPI front. Its lifespan owns the workers, the scheduler and the store.

Importing this module never imports torch; models load in the spawned workers.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse

from pipelines.jobs import WorkerConfig
from server.config import Settings
from server.errors import APIError, error_response, install_error_handlers
from server.registry import served_specs
from server.routes import files, health, images, models
from server.scheduler import Scheduler
from server.service import ImageService
from server.store import ImageStore
from server.workers import WorkerPool

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = frozenset({"/", "/health", "/ready", "/docs", "/openapi.json", "/favicon.ico"})


def worker_configs(settings: Settings, specs: dict) -> list[WorkerConfig]:
    return [
        WorkerConfig(
            weights_dir=str(settings.weights_dir),
            device=device,
            preload=[m for m in settings.preload if m in specs],
            threads=settings.worker_threads,
            log_level=settings.log_level,
            specs=specs,
        )
        for device in settings.devices
    ]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    import asyncio

    settings: Settings = app.state.settings
    pool = WorkerPool(worker_configs(settings, app.state.specs))
    pool.start(asyncio.get_running_loop())
    scheduler = Scheduler(
        pool, app.state.specs, settings.queue_size, settings.max_batch_images, settings.queue_timeout_s
    )
    scheduler.start()
    app.state.pool = pool
    app.state.scheduler = scheduler
    app.state.images = ImageService(settings, app.state.specs, scheduler, app.state.store, {})

    async def announce_ready() -> None:
        await pool.wait_ready(settings.worker_start_timeout_s)
        app.state.images.signatures = pool.signatures()
        logger.info("ready: serving %s", ", ".join(app.state.specs))

    waiting = asyncio.create_task(announce_ready())
    try:
        yield
    finally:
        waiting.cancel()
        await scheduler.stop()
        pool.stop()


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="fluxd",
        summary="FLUX image generation behind the OpenAI Images API",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.specs = served_specs(settings)
    app.state.store = ImageStore(
        settings.store_dir, settings.image_ttl_s, int(settings.store_quota_mb * 2**20)
    )
    app.state.started = int(time.time())
    keys = [key.encode() for key in settings.all_api_keys()]
    max_body = int(settings.max_body_mb * 2**20)

    install_error_handlers(app)
    for router in (images.router, models.router, files.router, health.router):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        started = time.perf_counter()
        response = _refuse(request, keys, max_body) or await call_next(request)
        response.headers["x-request-id"] = request_id
        logger.info(
            "%s %s %s %d %.0fms",
            request_id,
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    return app


def _refuse(request: Request, keys: list[bytes], max_body: int) -> Response | None:
    """Auth and body size, answered before any body is read."""
    if keys and request.url.path not in OPEN_PATHS and request.method != "OPTIONS":
        header = request.headers.get("authorization", "")
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        # compare_digest against every key so the time taken does not reveal which key nearly matched.
        if not any([hmac.compare_digest(token, key) for key in keys]):
            return error_response(
                APIError(
                    401,
                    "Incorrect API key provided."
                    if token
                    else "Missing API key: send Authorization: Bearer KEY.",
                    code="invalid_api_key",
                    headers={"x-should-retry": "false"},
                )
            )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        return error_response(
            APIError(
                413,
                f"Request body is larger than {max_body // 2**20} MB.",
                param="body",
                code="request_too_large",
                headers={"x-should-retry": "false"},
            )
        )
    return None
