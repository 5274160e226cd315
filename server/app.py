"""`create_app(settings)`: the FastAPI front. Its lifespan owns the workers, the scheduler and the store.

Importing this module never imports torch; models load in the spawned workers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipelines.contract.encoding import CONTENT_TYPES
from pipelines.contract.messages import WorkerConfig
from pipelines.contract.specs import ModelSpec
from server.declarations.errors import (
    install_error_handlers,
)
from server.declarations.settings import Settings
from server.dispatch.local_pool import Liveness, WorkerPool
from server.dispatch.pool import MakePool
from server.dispatch.scheduler import Scheduler
from server.front.guard import Guard
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
