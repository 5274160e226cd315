"""fluxd on Ray Serve: a local Ray cluster of two simulated nodes (ray.cluster_utils.Cluster) serving the
tiny checkpoints on the CPU, driven through Serve's HTTP proxy by the official openai SDK and httpx.

One cluster and one deployment for the whole module (Ray is heavy on 2 cores); every wait is bounded. The
engine deployment scales between 1 and 2 replicas, at most one per node, within seconds.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image

pytest.importorskip("ray", reason="ray is not installed: pip install -e '.[ray]'")

import ray
from ray import serve

from server.declarations.settings import Settings
from server.dispatch.ray_app import (
    APP_NAME,
    ENGINE,
    DeployFailed,
    build,
    deploy,
    for_the_cluster,
    local_cluster,
)
from server.front.registry import served_specs
from server.tools.bench import main as bench_main
from tests.imagery import png

# The tests average load over 2 s to scale within seconds, below the 10 s that Serve's deprecated
# metrics_interval_s still compares against; the load reports themselves come every 0.5 s (see `served`).
pytestmark = [
    pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning"),
    # The first test also starts the cluster and deploys: minutes on 2 cores busy with the rest of the suite.
    pytest.mark.timeout(900),
]

ROOT = Path(__file__).resolve().parents[2]
FAST = {"num_inference_steps": 4}
# A request may wait for a replica that is starting: minutes on 2 busy cores (see pytestmark).
ANSWER_S = 360
HTTP = httpx.Client(timeout=ANSWER_S, trust_env=False)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def engine_replicas(*states: str) -> int:
    """The engine replicas in any of `states` (Serve's replica states), RUNNING by default."""
    deployment = serve.status().applications[APP_NAME].deployments[ENGINE]
    wanted = states or ("RUNNING",)
    return sum(count for state, count in deployment.replica_states.items() if state in wanted)


@dataclass
class Served:
    url: str
    port: int
    address: str
    settings: Settings

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="unused",
            max_retries=0,
            timeout=ANSWER_S,
            _strict_response_validation=True,
        )

    def ready(self) -> dict:
        return HTTP.get(f"{self.url}/ready").json()


@pytest.fixture(scope="module")
def served(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    env = {
        # The replicas import this checkout, whatever else the environment has installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        # Load reports every half second instead of every ten: scaling within seconds.
        "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    }
    with mock.patch.dict(os.environ, env):
        cluster = local_cluster(nodes=2, cpus_per_node=4)
        try:
            ray.init(address=cluster.address)
            port = free_port()
            # One HTTP proxy: simulated nodes share this machine's port (SO_REUSEPORT), and Serve drains the
            # proxy of a node left without replicas, which would refuse some connections here.
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            settings = for_the_cluster(
                Settings.model_validate(
                    {
                        "ray": cluster.address,
                        "demo": True,
                        "weights_dir": tiny_weights,
                        "store_dir": tmp_path_factory.mktemp("store"),
                        "worker_threads": 1,
                        "ray_min_replicas": 1,
                        "ray_max_replicas": 2,
                        "ray_max_replicas_per_node": 1,
                        "ray_upscale_delay_s": 1,
                        "ray_downscale_delay_s": 3,
                        "ray_autoscaling_window_s": 2,
                    }
                )
            )
            deploy(settings, served_specs(settings), timeout_s=300)
            running = Served(f"http://127.0.0.1:{port}", port, cluster.address, settings)
            wait_for(lambda: HTTP.get(f"{running.url}/ready").status_code == 200, 120, "/ready")
            yield running
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


class Burst:
    """Requests sent back to back from `clients` threads until stopped; counts the answers by status."""

    def __init__(self, served: Served, clients: int) -> None:
        self.served = served
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.pool = ThreadPoolExecutor(clients)
        for i in range(clients):
            self.pool.submit(self._send, i)

    def _send(self, seed: int) -> None:
        # Large enough that the replica's render, not the HTTP path's overhead, takes a request's time: the
        # burst keeps the replicas busy while leaving the CPU to the starting replica.
        body = {"prompt": "a red fox", "size": "256x256", "response_format": "b64_json", "seed": seed, **FAST}
        while not self.stop.is_set():
            response = HTTP.post(f"{self.served.url}/v1/images/generations", json=body)
            self.statuses.append(response.status_code)

    def end(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)


def only_image(result: ImagesResponse) -> Image.Image:
    assert result.data and len(result.data) == 1 and result.data[0].b64_json
    return Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))


def served_nodes(served: Served) -> set[str]:
    return {replica["node"] for replica in served.ready()["replicas"]}


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_after(served: Served) -> None:
    wait_for(lambda: engine_replicas() == 1, 90, "back to one engine replica before the burst")
    burst = Burst(served, clients=4)
    try:
        # Serve's decision is what the autoscaling settings time; the replica's start (a Ray worker, torch,
        # the models) then takes what the machine gives it, minutes on 2 cores shared with the rest of the
        # suite, so it has a wider bound.
        wait_for(lambda: engine_replicas("STARTING", "RUNNING") == 2, 120, "Serve adding an engine replica")
        wait_for(lambda: engine_replicas() == 2, 360, "the second engine replica running")
        # The second replica takes batches too: it is on the other simulated node (one replica per node).
        wait_for(lambda: len(served_nodes(served)) == 2, 60, "batches served on both nodes")
    finally:
        burst.end()
    assert burst.statuses and set(burst.statuses) == {200}
    wait_for(lambda: engine_replicas() == 1, 90, "back to one engine replica once the burst stopped")


def test_openai_sdk_generates_edits_and_streams_through_serve(served: Served) -> None:
    client = served.client()
    result = client.images.generate(
        model="flux.2-dev", prompt="a lighthouse", size="64x48", response_format="b64_json", extra_body=FAST
    )
    assert only_image(result).size == (64, 48)
    edited = client.images.edit(
        model="flux.1-kontext-dev",
        image=("ref.png", png(), "image/png"),
        prompt="make it red",
        size="64x64",
        response_format="b64_json",
        extra_body=FAST,
    )
    assert only_image(edited).size == (64, 64)
    events = list(
        client.images.generate(
            prompt="a red fox",
            size="64x64",
            stream=True,
            partial_images=2,
            extra_body={"num_inference_steps": 6},
        )
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    # Requests were served by replicas on both simulated nodes (here or, under a burst, in the test above).
    if len(served_nodes(served)) < 2:
        burst = Burst(served, clients=4)
        try:
            wait_for(lambda: len(served_nodes(served)) == 2, 150, "batches served on both nodes")
        finally:
            burst.end()
    assert len(served_nodes(served)) == 2


def test_a_url_answer_is_fetched_through_the_proxy(served: Served) -> None:
    result = served.client().images.generate(
        prompt="a cat", size="32x32", response_format="url", extra_body=FAST
    )
    assert result.data
    url = result.data[0].url
    assert url is not None and url.startswith(f"{served.url}/v1/files/images/")
    image = HTTP.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (32, 32)


def queued(served: Served) -> float:
    metrics = HTTP.get(f"{served.url}/metrics").text
    return sum(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("fluxd_queue_depth{")
    )


def test_the_front_holds_more_requests_than_serves_default_limit_so_they_queue_in_its_scheduler(
    served: Served,
) -> None:
    # Eight requests that cannot share a batch (each its own step count): one per lane runs, the others
    # wait in the scheduler's queue, where batching, deadlines and 429s apply, not in Serve's proxy.
    bodies = [
        {"prompt": "a fox", "size": "256x256", "num_inference_steps": 20 + i, "response_format": "b64_json"}
        for i in range(8)
    ]
    lanes = len(served.ready()["workers"])
    depths: list[float] = []
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = [pool.submit(HTTP.post, f"{served.url}/v1/images/generations", json=b) for b in bodies]
        while not all(answer.done() for answer in answers):
            depths.append(queued(served))
    assert [answer.result().status_code for answer in answers] == [200] * len(bodies)
    assert max(depths) >= len(bodies) - lanes - 1


def test_a_killed_replica_answers_503_with_retry_after_and_serve_replaces_it(served: Served) -> None:
    restarts = sum(worker["restarts"] for worker in served.ready()["workers"])
    answer: dict[str, httpx.Response] = {}
    slow = {
        "prompt": "a slow one",
        "size": "512x512",
        "num_inference_steps": 50,
        "response_format": "b64_json",
    }
    sender = threading.Thread(
        target=lambda: answer.setdefault(
            "response", HTTP.post(f"{served.url}/v1/images/generations", json=slow)
        )
    )
    sender.start()
    running: list[int] = []

    def replica_running() -> bool:
        running[:] = [w["pid"] for w in served.ready()["workers"] if w["busy_images"] and w["pid"]]
        return bool(running)

    wait_for(replica_running, 60, "the slow request running on a replica", every_s=0.1)
    os.kill(running[0], signal.SIGKILL)
    sender.join(timeout=ANSWER_S)
    response = answer["response"]
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_restarted"
    assert int(response.headers["retry-after"]) >= 1
    after = served.client().images.generate(
        prompt="again", size="32x32", response_format="b64_json", extra_body=FAST
    )
    assert only_image(after).size == (32, 32)
    assert sum(worker["restarts"] for worker in served.ready()["workers"]) == restarts + 1
    wait_for(lambda: engine_replicas() >= 1, ANSWER_S, "Serve replaced the replica")


def test_a_node_without_the_weights_fails_the_deployment_with_the_reason(
    served: Served, tmp_path: Path
) -> None:
    settings = served.settings.model_copy(update={"weights_dir": tmp_path, "ray_max_replicas": 1})
    try:
        with pytest.raises(DeployFailed, match=rf"has no weights for flux\.2-dev.* in {tmp_path}"):
            # The front decided what to serve where the weights were; the replicas' node lacks them.
            deploy(
                settings,
                served_specs(served.settings),
                timeout_s=ANSWER_S,
                name="missing",
                route_prefix="/missing",
            )
    finally:
        serve.delete("missing")


def test_the_kuberay_builder_needs_a_key_and_builds_the_application(
    served: Served, tiny_weights: Path
) -> None:
    args = {"weights_dir": str(tiny_weights), "demo": True}
    with mock.patch.dict(os.environ, {"FLUXD_API_KEYS": ""}), pytest.raises(ValueError, match="API key"):
        build(args)
    with mock.patch.dict(os.environ, {"FLUXD_API_KEYS": "k1"}):
        assert isinstance(build(args), serve.Application)


def test_bench_reports_images_per_second_with_one_and_two_replicas(
    served: Served, tiny_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Last: the bench redeploys the application with one, then two replicas, and takes it down.
    code = bench_main(
        [
            "--ray",
            served.address,
            "--port",
            str(served.port),
            "--weights-dir",
            str(tiny_weights),
            "--requests",
            "8",
            "--concurrency",
            "4",
        ]
    )
    report = capsys.readouterr().out
    assert code == 0, report
    assert "images/s with 1 engine replica" in report
    assert "images/s with 2 engine replicas" in report
    assert "2 replicas / 1" in report
