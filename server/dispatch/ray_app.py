"""fluxd as one Ray Serve application: the front (fluxd's own FastAPI app) and the engine replicas.

- FluxdFront, the ingress: `create_app` as `fluxd serve` runs it (routes, errors, auth, store, metrics,
  streaming, scheduler), its pool being RayPool (server/dispatch/ray_pool.py) instead of spawned processes.
  ONE replica, on purpose: the scheduler's queues, batching, deadlines and Retry-After estimates are one queue
  per model for the whole cluster, and `url` answers live in that replica's store, so a GET for one works
  whichever node's HTTP proxy receives it. The front is light (no torch); it needs no GPU.
- FluxdEngine (pipelines/engine/replica.py), one replica per GPU (or CPU replicas without GPUs): the Engine
  of a local worker. Serve places the replicas, restarts one that dies and scales their number on the batches
  in flight.

`fluxd serve --ray auto|ADDRESS|local` calls `serve_on_ray`; KubeRay's RayService imports `build`.
Imported only with --ray: the plain install never imports ray. Torch is imported inside the engine replica.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import ray
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus

from pipelines.contract.specs import ModelSpec
from pipelines.engine.replica import FluxdEngine
from server.app import create_app, worker_configs
from server.declarations.settings import Settings
from server.declarations.settings_loading import problems
from server.dispatch.ray_pool import RayPool, lane_count
from server.front.registry import served_specs

logger = logging.getLogger(__name__)

APP_NAME = "fluxd"
FRONT = "FluxdFront"
ENGINE = "FluxdEngine"
FRONT_CPUS = 1.0
ENGINE_DRAIN_S = 600.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DeployFailed(RuntimeError):
    """The application did not come up: the message says which deployment and why."""


def _log_to(level: str) -> None:
    # A Ray worker process starts without fluxd's logging: its INFO lines (one per request) would be lost.
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for name in ("server", "pipelines"):
        logging.getLogger(name).setLevel(level)


class FluxdFront:
    """fluxd's FastAPI app, its batches sent to the engine deployment."""

    def __init__(self, settings: Settings, specs: dict[str, ModelSpec], engine: DeploymentHandle) -> None:
        _log_to(settings.log_level)
        self.settings = settings
        self.specs = specs
        self.engine = engine

    def __serve_build_asgi_app__(self) -> FastAPI:
        lanes = lane_count(self.settings)
        return create_app(
            self.settings,
            lambda configs, liveness, on_restart: RayPool(
                self.engine, configs[0], lanes, liveness, on_restart
            ),
            self.specs,
        )


ENGINE_DEPLOYMENT = serve.deployment(name=ENGINE)(FluxdEngine)
FRONT_DEPLOYMENT = serve.deployment(name=FRONT, num_replicas=1, ray_actor_options={"num_cpus": FRONT_CPUS})(
    serve.ingress()(FluxdFront)
)


# ---- building and deploying ----------------------------------------------------------------------------


def replica_gpus(settings: Settings) -> float:
    """ray_gpus_per_replica, else one GPU each when the cluster has any, else none (CPU replicas)."""
    if settings.ray_gpus_per_replica is not None:
        return settings.ray_gpus_per_replica
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def for_the_cluster(settings: Settings) -> Settings:
    """Settings whose paths and keys mean the same in every replica: absolute folders (the same path on every
    node), the key file read here once."""
    return settings.model_copy(
        update={
            "weights_dir": settings.weights_dir.expanduser().resolve(),
            "store_dir": settings.store_dir.expanduser().resolve(),
            "api_keys": [SecretStr(key) for key in settings.all_api_keys()],
            "api_key_file": None,
        }
    )


def application(settings: Settings, specs: Mapping[str, ModelSpec], gpus: float) -> serve.Application:
    """The front bound to the engine deployment, sized and scaled by the settings."""
    device = "cuda:0" if gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the replica's own GPU
    [config] = worker_configs(settings.model_copy(update={"devices": [device]}), dict(specs))
    config = dataclasses.replace(config, parent_pid=None)  # a replica outlives the process that deployed it
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": settings.ray_cpus_per_replica},
        "max_ongoing_requests": max(1, math.ceil(settings.ray_target_ongoing_requests)),
        # A replica being removed (scaling down, a redeploy) first finishes its batch: Serve's default of 20 s
        # is shorter than a FLUX batch in the offload modes.
        "graceful_shutdown_timeout_s": ENGINE_DRAIN_S,
        "autoscaling_config": {
            "min_replicas": settings.ray_min_replicas,
            "initial_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
            "upscale_delay_s": settings.ray_upscale_delay_s,
            "downscale_delay_s": settings.ray_downscale_delay_s,
            "look_back_period_s": settings.ray_autoscaling_window_s,
        },
    }
    if settings.ray_max_replicas_per_node is not None:
        options["max_replicas_per_node"] = settings.ray_max_replicas_per_node
    engine = ENGINE_DEPLOYMENT.options(**options).bind(config)
    # The front admits and refuses requests itself (429 past --queue-size per model): Serve's own limit per
    # replica (5 by default) must never bind first, or requests would wait in the proxy, unseen by the
    # scheduler's batching and deadlines. Room for every queued and running job, and the light routes.
    capacity = settings.queue_size * len(specs) + lane_count(settings) * settings.max_batch_images + 256
    return FRONT_DEPLOYMENT.options(max_ongoing_requests=capacity).bind(settings, dict(specs), engine)


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder of a Serve config file (KubeRay's RayService: `import_path:
    server.dispatch.ray_app:build`): `args` are settings by field name, over FLUXD_* environment variables."""
    try:
        settings = for_the_cluster(Settings(**{"ray": "auto", **args}))  # arguments over FLUXD_* variables
    except (ValidationError, SettingsError) as exc:
        # Serve reports the builder's error as it is raised: pydantic's own text would show every input,
        # secrets included; `from None`, since the chained original would too.
        raise ValueError(f"fluxd settings: {problems(exc)}") from None
    if not settings.all_api_keys() and not settings.no_auth:
        raise ValueError("fluxd on a cluster needs an API key: set FLUXD_API_KEYS (or no_auth: true)")
    specs = served_specs(settings)
    if not specs:
        raise ValueError(f"no model weights found in {settings.weights_dir}")
    return application(settings, specs, replica_gpus(settings))


def _failure(status: Any) -> str:
    """Why an application failed or is stuck: each deployment's message, of which the last line says it (a
    replica constructor's error ends the traceback Serve reports)."""
    reasons = []
    for name, deployment in status.deployments.items():
        lines = [line.strip() for line in deployment.message.splitlines() if line.strip()]
        if lines:
            reasons.append(f"{name}: {lines[-1]}")
    return "; ".join(reasons) or status.message or str(status.status)


def deploy(
    settings: Settings,
    specs: Mapping[str, ModelSpec],
    timeout_s: float,
    name: str = APP_NAME,
    route_prefix: str = "/",
) -> None:
    """Deploy (or update) the application on the connected cluster and wait until it runs; a deployment that
    fails or is not running after `timeout_s` is taken down and raises DeployFailed with Serve's reason.

    serve.run would wait without end for replicas the cluster cannot place (not enough GPUs or logical CPUs):
    `serve._run(_blocking=False)`, which serve.run calls, returns once the deployments are registered, and the
    status is watched here, with a deadline. (A private function, hence the exact ray pin.)
    """
    serve._run(
        application(settings, specs, replica_gpus(settings)),
        _blocking=False,
        name=name,
        route_prefix=route_prefix,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            reason = _failure(status)
            break
        if time.monotonic() > deadline:
            reason = f"not running after {timeout_s:.0f} s: " + (_failure(status) if status else "no status")
            break
        time.sleep(1.0)
    serve.delete(name)
    raise DeployFailed(reason)


def local_cluster(nodes: int, cpus_per_node: int) -> Any:
    """A Ray cluster of `nodes` simulated nodes on this machine (ray.cluster_utils.Cluster), for the bench
    and the tests. Logical CPUs are declared generously: a replica asking for more than a node declares
    waits for ever without failing."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False}
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def connect(address: str, settings: Settings) -> None:
    """Join the cluster at `address` ('auto' or an address), or start one here ('local')."""
    if address == "local":
        # The front, every engine replica at its maximum, and one spare: a replica asking for more logical
        # CPUs than declared would wait for ever.
        needed = FRONT_CPUS + settings.ray_max_replicas * settings.ray_cpus_per_replica + 1
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False)
    else:
        ray.init(address=address)


def serve_on_ray(settings: Settings) -> int:
    """`fluxd serve --ray`: deploy the application, serve until SIGINT/SIGTERM, then take it down."""
    address = settings.ray
    assert address is not None
    settings = for_the_cluster(settings)
    specs = served_specs(settings)
    if not specs:
        print(f"fluxd: no model weights found in {settings.weights_dir}.", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    connect(address, settings)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            deploy(settings, specs, settings.worker_start_timeout_s)
        except DeployFailed as exc:
            print(f"fluxd: the Ray Serve application failed to deploy: {exc}", file=sys.stderr)
            return 2
        url = f"http://{settings.host}:{settings.port}"
        print(
            f"\nfluxd serving {', '.join(specs)} through Ray Serve at {url}/v1 "
            f"({settings.ray_min_replicas}-{settings.ray_max_replicas} engine replicas, one front)",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        if address == "local":
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
