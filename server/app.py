"""`create_app(settings)`: the FastAPI front. Its lifespan owns the workers, the scheduler and the store.

Importing this module never imports torch; models load in the spawned workers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines.contract.encoding import CONTENT_TYPES
from pipelines.contract.messages import WorkerConfig
from pipelines.contract.specs import ModelSpec
from server.declarations.errors import (
    APIError,
    BodyTooLarge,
    answer_unexpected,
    body_too_large,
    error_response,
    install_error_handlers,
)
from server.declarations.settings import Settings
from server.dispatch.local_pool import Liveness, WorkerPool
from server.dispatch.pool import MakePool
from server.dispatch.scheduler import Scheduler
from server.front.metrics import Metrics
from server.front.openapi import install_openapi
from server.front.registry import requested_modes, served_specs
from server.front.routes import files, health, images, jobs, loras, models
from server.front.service import ImageService
from server.front.store import ImageStore
from server.jobs.service import JobService
from server.jobs.webhooks import Webhooks

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = frozenset({"/", "/health", "/ready", "/metrics", "/docs", "/openapi.json", "/favicon.ico"})
# An image URL's 192-bit id is its capability: it must work in an <img> or another service without the key.
OPEN_PREFIXES = ("/v1/files/images/",)


def worker_configs(settings: Settings, specs: dict) -> list[WorkerConfig]:
    """One config per device, each value from its setting, whose declaration holds its default: here only
    units change."""
    return [
        WorkerConfig(
            weights_dir=str(settings.weights_dir),
            device=device,
            preload=[m for m in settings.preload if m in specs],
            threads=settings.worker_threads,
            parent_pid=os.getpid(),
            memory_budget_bytes=int(settings.memory_budget_gb * 2**30) if settings.memory_budget_gb else None,
            prompt_cache_bytes=int(settings.prompt_cache_mb * 2**20),
            lora_cache_bytes=int(settings.lora_cache_mb * 2**20),
            modes=requested_modes(settings, specs),
            synthetic=settings.synthetic_weights,
            log_level=settings.log_level,
            specs=specs,
            entry=settings.worker_entry,
            # Several beats per timeout, so that one late beat on a loaded machine does not kill a worker.
            heartbeat_s=min(1.0, settings.worker_heartbeat_timeout_s / 5),
            safety_threshold=settings.safety_threshold,
        )
        for device in settings.devices
    ]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    import asyncio

    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    store: ImageStore = app.state.store
    await asyncio.to_thread(store.open)  # indexes what an earlier run stored, before a url is asked for
    liveness = Liveness(
        settings.worker_heartbeat_timeout_s, settings.batch_deadline_floor_s, settings.batch_deadline_factor
    )
    pool = app.state.make_pool(
        worker_configs(settings, app.state.specs),
        liveness,
        lambda name: metrics.worker_restarts.labels(name).inc(),
    )
    scheduler = Scheduler(
        pool,
        app.state.specs,
        settings.queue_size,
        settings.max_batch_images,
        settings.queue_timeout_s,
        metrics,
    )
    pool.start(asyncio.get_running_loop(), on_ready=scheduler.wake)
    scheduler.start()
    app.state.pool = pool
    app.state.scheduler = scheduler
    app.state.images = ImageService(settings, app.state.specs, scheduler, app.state.store)
    # In a folder of its own beside the url store's.
    jobs = JobService(
        settings,
        app.state.specs,
        settings.store_dir / "fluxd-jobs",
        scheduler,
        app.state.images,
        app.state.webhooks,
        metrics,
    )
    app.state.jobs = jobs
    await jobs.start()

    async def announce_ready() -> None:
        await pool.wait_ready(settings.worker_start_timeout_s)
        logger.info("ready: serving %s", ", ".join(app.state.specs))

    async def sweep_store() -> None:
        # Expired images go even when no request writes, so a full disk frees itself.
        while True:
            await asyncio.sleep(settings.store_sweep_interval_s)
            try:
                await asyncio.to_thread(store.sweep)
            except Exception:
                logger.exception("url store sweep failed")

    waiting = asyncio.create_task(announce_ready())
    sweeping = asyncio.create_task(sweep_store())
    try:
        yield
    finally:
        # First, so a worker that the same signal stopped (a terminal's Ctrl-C reaches the whole process
        # group) is not restarted while the server shuts down.
        pool.closing()
        waiting.cancel()
        sweeping.cancel()
        await jobs.stop()  # before the workers stop, or their jobs would fail instead of waiting
        await scheduler.stop()
        pool.stop()
        jobs.close()


def create_app(
    settings: Settings,
    make_pool: MakePool = WorkerPool,
    specs: dict[str, ModelSpec] | None = None,
) -> FastAPI:
    """The app; `make_pool(configs, liveness, on_restart)` builds what runs the renders (the spawned workers,
    the Ray Serve replicas of server/dispatch/ray_app.py, or a test's stand-in for the process boundary);
    `specs`, the models served (default: those whose weights are in --weights-dir here)."""
    app = FastAPI(
        title="fluxd",
        summary="FLUX image generation behind the OpenAI Images API",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.make_pool = make_pool
    app.state.specs = served_specs(settings) if specs is None else specs
    app.state.store = ImageStore(
        settings.store_dir, settings.image_ttl_s, int(settings.store_quota_mb * 2**20), CONTENT_TYPES
    )
    app.state.started = int(time.time())
    app.state.metrics = Metrics()
    secret = settings.webhook_secret
    app.state.webhooks = Webhooks(settings.webhook_allow, secret.get_secret_value() if secret else None)
    keys = [key.encode() for key in settings.all_api_keys()]
    max_body = int(settings.max_body_mb * 2**20)

    install_error_handlers(app)
    install_openapi(app)
    for router in (images.router, jobs.router, models.router, loras.router, files.router, health.router):
        app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(Guard, keys=keys, max_body=max_body, metrics=app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["x-request-id"],
        )
    return app


class Guard:
    """Request ids, auth, body size, error counts and the one log line per request.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware hides client disconnects from the endpoint,
    and cancelling a job whose client went away depends on seeing them.
    """

    def __init__(self, app: ASGIApp, keys: list[bytes], max_body: int, metrics: Metrics) -> None:
        self.app = app
        self.keys = keys
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        request_id = request.headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        request.state.request_id = request_id
        started = time.perf_counter()
        status = 500

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                if status >= 400:
                    self.metrics.errors.labels(str(status), headers.get("x-error-code", "unknown")).inc()
            await send(message)

        received = 0

        async def receive_within_limit() -> Message:
            # Content-Length is checked before anything is read; a chunked body is counted as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        # Async jobs belong to a key: its hash, never the key, goes into the job table.
        request.state.caller = hashlib.sha256(_bearer(request)).hexdigest() if self.keys else ""
        refusal = _refuse(request, self.keys, self.max_body)
        try:
            await (refusal or self.app)(scope, receive_within_limit, send_with_id)
        except Exception as exc:
            if started_response:
                raise
            # Answered here rather than by an `Exception` handler, which Starlette re-raises after it
            # answers: uvicorn then drops the keep-alive connection the client is about to reuse.
            await answer_unexpected(exc, request.method, scope["path"])(scope, receive, send_with_id)
        job = getattr(request.state, "job", None)
        logger.info(
            "%s %s %s %d %.0fms%s",
            request_id,
            request.method,
            scope["path"],
            status,
            (time.perf_counter() - started) * 1000,
            f" {job}" if job else "",
        )


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _bearer(request: Request) -> bytes:
    header = request.headers.get("authorization", "")
    return header[7:].strip().encode() if header[:7].lower() == "bearer " else b""


def _refuse(request: Request, keys: list[bytes], max_body: int) -> Response | None:
    """Auth and body size, answered before any body is read."""
    if keys and not _open(request.url.path) and request.method != "OPTIONS":
        token = _bearer(request)
        # compare_digest against every key so the time taken does not reveal which key nearly matched.
        if not any([hmac.compare_digest(token, key) for key in keys]):
            message = (
                "Incorrect API key provided." if token else "Missing API key: send Authorization: Bearer KEY."
            )
            return error_response(APIError("invalid_api_key", message))
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        return error_response(body_too_large(max_body))
    return None
