"""`fluxd bench serve --ray local|auto|ADDRESS`: images/s through Ray Serve with one engine replica, then
two, in one run, over the tiny checkpoints.

`local` starts a cluster of two simulated nodes on this machine (ray.cluster_utils.Cluster); another value
joins that cluster. The application is deployed with one replica, measured, redeployed with two (at most
one per node) and measured again with the same load as the batching measure of `fluxd bench serve`
(--requests at --concurrency, batching up to --max-batch-images).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.declarations.settings import ENV_PREFIX, Settings
from server.tools.bench_harness import (
    HOST,
    READY_TIMEOUT_S,
    BenchError,
    free_port,
    measure_throughput,
    write_tiny_weights,
)
from server.tools.bench_report import Row, Throughput, ratio

if TYPE_CHECKING:
    import httpx

REPLICAS = (1, 2)
NODES = 2
CPUS_PER_NODE = 4  # logical: the front, a replica and Serve's proxy on one node, with room to spare


@dataclass(frozen=True)
class ReplicaThroughput:
    replicas: int
    measured: Throughput


def replica_rows(measured: list[ReplicaThroughput], concurrency: int, max_batch_images: int) -> list[Row]:
    """Images/s per replica count, and the ratio of the largest to one replica: figures, not targets."""
    shape = f"flux.2-dev 256x256, 28 steps, concurrency {concurrency}, --max-batch-images {max_batch_images}"
    rows = [
        Row(
            f"Ray Serve: images/s with {m.replicas} engine replica{'s' if m.replicas > 1 else ''} ({shape}, "
            f"{m.measured.requests} requests)",
            f"{m.measured.per_second:.2f} img/s",
            "-",
            None,
        )
        for m in measured
    ]
    if len(measured) > 1:
        first, last = measured[0], measured[-1]
        rows.append(
            Row(
                f"Ray Serve: {last.replicas} replicas / {first.replicas}",
                f"{ratio(last.measured.per_second, first.measured.per_second):.2f}",
                "-",
                None,
            )
        )
    return rows


def _without_environment(values: dict[str, Any]) -> Settings:
    """Settings from `values` and the defaults: the caller's FLUXD_* variables (keys, queue sizes, a config
    file) would change what is measured."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith(ENV_PREFIX)}
    try:
        return Settings.model_validate(values)
    finally:
        os.environ.update(saved)


def _wait_ready(client: httpx.Client, url: str) -> None:
    import httpx

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if client.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise BenchError(f"the Ray Serve application was not ready in {READY_TIMEOUT_S:.0f} s")


def measure_replicas(args: argparse.Namespace, client: httpx.Client, workdir: Path) -> list[Row]:
    import ray
    from ray import serve

    from server.dispatch.ray_app import APP_NAME, DeployFailed, deploy, for_the_cluster, local_cluster
    from server.front.registry import served_specs

    weights = args.weights_dir or write_tiny_weights(workdir / "weights")
    cluster = local_cluster(NODES, CPUS_PER_NODE) if args.ray == "local" else None
    joined = not ray.is_initialized()
    if joined:
        ray.init(address=cluster.address if cluster is not None else args.ray)
    port = args.port or free_port()
    url = f"http://{HOST}:{port}"
    measured: list[ReplicaThroughput] = []
    try:
        # The bench's client is here: one proxy, on the head (simulated nodes would share its port).
        serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": port})
        for replicas in REPLICAS:
            settings = for_the_cluster(
                _without_environment(
                    {
                        "ray": args.ray,
                        "demo": True,
                        "weights_dir": weights,
                        "store_dir": workdir / "store",
                        "max_batch_images": args.max_batch_images,
                        "worker_threads": 1,
                        "log_level": "WARNING",
                        "ray_min_replicas": replicas,
                        "ray_max_replicas": replicas,
                        "ray_max_replicas_per_node": 1,
                    }
                )
            )
            try:
                deploy(settings, served_specs(settings), READY_TIMEOUT_S)
            except DeployFailed as exc:
                raise BenchError(f"{replicas} replicas: {exc}") from exc
            _wait_ready(client, url)
            deadline = time.monotonic() + args.phase_timeout
            throughput = measure_throughput(client, url, args.requests, args.concurrency, deadline)
            measured.append(ReplicaThroughput(replicas, throughput))
    finally:
        if cluster is not None:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        if joined:
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return replica_rows(measured, args.concurrency, args.max_batch_images)


LOCAL_NOTE = (
    "With --ray local both simulated nodes are this machine, and each CPU replica runs torch on one thread: "
    "one replica leaves the other cores to the front, Serve's proxy and the load generator, and a second "
    "replica gains only what they leave. The ratio shows that Serve spreads batches over both replicas, "
    "not what a second GPU node adds, which only a cluster of GPUs measures."
)
