"""The worker pool on a Ray cluster: batches run on the engine deployment's replicas, through Ray Serve.

RayPool is a Pool (server/dispatch/pool.py), so the scheduler (batching, deadlines, cancellation), /ready and
/v1/models use it unchanged; each lane keeps WorkerHandle's bookkeeping (pending futures, progress listeners,
the Ready/Progress/RenderResult/Failure messages). Only the transport differs: a batch is one streaming call
on the engine deployment, whose replica answers with the messages a worker process sends, preceded by
Assigned. Serve picks the replica, replaces one that dies and sets their number.

A lane is one batch in flight. The pool has as many lanes as the replicas can take at their autoscaling
target (ray_max_replicas x ray_target_ongoing_requests), so under a burst every lane is busy, the calls that
no replica can take yet wait in Serve's router, and Serve counts them as load and adds replicas.

Imported only when fluxd serves through Ray (--ray): the plain install never imports ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from pipelines.contract.errors import SERVER_ERROR
from pipelines.contract.messages import Assigned, Failure, Ready, RenderRequest, WorkerConfig
from pipelines.contract.wire import decode_message, encode_batch
from server.declarations.settings import Settings
from server.dispatch.local_pool import Liveness, WorkerHandle
from server.dispatch.pool import WorkerCrashed, WorkerFailure, all_ready, wait_all_ready

logger = logging.getLogger(__name__)

DESCRIBE_RETRY_S = 1.0


def lane_count(settings: Settings) -> int:
    return max(1, math.ceil(settings.ray_max_replicas * settings.ray_target_ongoing_requests))


@dataclass
class ReplicaLane(WorkerHandle):
    """One batch at a time sent to the engine deployment; `replica` is where the latest one ran."""

    engine: DeploymentHandle | None = None
    on_assigned: Callable[[Assigned], None] | None = None
    replica: Assigned | None = None
    _call: DeploymentResponseGenerator | None = None
    _call_ids: set[str] = field(default_factory=set)
    _cancelled: set[str] = field(default_factory=set)
    _task: asyncio.Task | None = None

    def start(self) -> None:
        """Nothing to spawn: Serve runs the replicas. The lane turns ready when the pool has described one."""

    @property
    def pid(self) -> int | None:
        return self.replica.pid if self.replica is not None else None

    def stop(self) -> None:
        self.closing()
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()

    def _send(self, batch: list[RenderRequest]) -> None:
        assert self.engine is not None, "RayPool gives every lane the engine deployment's handle"
        self.replica = None  # until the replica that takes this batch says which it is
        self._call_ids = {request.id for request in batch}
        self._cancelled = set()
        call = self.engine.options(stream=True, method_name="run").remote(encode_batch(batch))
        assert isinstance(call, DeploymentResponseGenerator)  # what stream=True answers
        self._call = call
        self._task = self.loop.create_task(self._receive(call, sorted(self._call_ids)))

    def _send_cancel(self, request_id: str) -> None:
        # Serve cancels a call, not one request of it; the engine too stops only once every request of the
        # batch is gone (the others finish, and a gone one's images are dropped), so nothing is lost.
        self._cancelled.add(request_id)
        if self._call is not None and self._cancelled >= self._call_ids:
            self._call.cancel()

    async def _receive(self, call: DeploymentResponseGenerator, ids: list[str]) -> None:
        try:
            async for data in call:
                message = decode_message(data)
                if isinstance(message, Assigned):
                    self.replica = message
                    if self.on_assigned is not None:
                        self.on_assigned(message)
                else:
                    self._handle(message)
        except RequestCancelledError:
            pass  # every request of the batch was cancelled, and their futures with them
        except (RayActorError, ActorUnavailableError) as exc:
            self._replica_lost(exc)
        except Exception:
            logger.exception("batch %s failed on the Ray cluster", ids)
            failure = Failure(ids, "server_error", SERVER_ERROR)
            self._fail_all(ids, lambda: WorkerFailure(failure))
        finally:
            if self._call is call:
                self._call = None
            self._fail_all(
                ids, lambda: WorkerCrashed(f"lane {self.name}: the replica ended the call unanswered")
            )

    def _replica_lost(self, exc: Exception) -> None:
        where = f"{self.replica.replica} on {self.replica.node}" if self.replica else "unknown"
        self.restarts += 1
        if self.on_restart is not None:
            self.on_restart(self.name)
        logger.error(
            "engine replica %s died with a batch of lane %s (%s); Serve replaces it", where, self.name, exc
        )
        self._fail_all(list(self._pending), lambda: WorkerCrashed(f"engine replica {where} died"))

    def _fail_all(self, ids: list[str], error: Callable[[], Exception]) -> None:
        for request_id in ids:
            self._resolve(request_id, lambda future: future.set_exception(error()))


class RayPool:
    """Lanes into the engine deployment: a Pool (server/dispatch/pool.py)."""

    def __init__(
        self,
        engine: DeploymentHandle,
        config: WorkerConfig,
        lanes: int,
        liveness: Liveness,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.liveness = liveness
        self.on_restart = on_restart
        self.workers: list[ReplicaLane] = []
        self.engine = engine
        self.lanes = lanes
        self._served: dict[str, dict[str, Any]] = {}
        self._describing: asyncio.Task | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None] | None = None) -> None:
        for index in range(self.lanes):
            self.workers.append(
                ReplicaLane(
                    f"ray:{index}",
                    self.config,
                    loop,
                    self.liveness,
                    on_restart=self.on_restart,
                    on_ready=on_ready,
                    engine=self.engine,
                    on_assigned=self._note,
                )
            )
        self._describing = loop.create_task(self._describe())

    async def _describe(self) -> None:
        # Serve deploys the front and the engine together: the engine's replicas may still be loading.
        while True:
            try:
                ready = decode_message(await self.engine.describe.remote())
                break
            except (RayActorError, ActorUnavailableError) as exc:
                logger.warning("engine deployment not answering yet (%s); retrying", exc)
                await asyncio.sleep(DESCRIBE_RETRY_S)
        assert isinstance(ready, Ready)  # what describe answers
        for lane in self.workers:
            lane._handle(dataclasses.replace(ready))

    def _note(self, assigned: Assigned) -> None:
        entry = self._served.setdefault(
            assigned.replica, {"replica": assigned.replica, "node": assigned.node, "pid": assigned.pid}
        )
        entry["batches"] = entry.get("batches", 0) + 1

    def replicas(self) -> list[dict[str, Any]]:
        """Every engine replica that has taken a batch from this front: where it runs, how many batches."""
        return list(self._served.values())

    def modes(self, weights_id: str) -> list[dict[str, Any]]:
        """Each replica resolves the mode on its own GPU; they are alike, so one replica's answer stands."""
        for lane in self.workers:
            if lane.info is not None and weights_id in lane.info.modes:
                return [
                    {"device": f"{lane.info.device} (each Ray Serve replica)", **lane.info.modes[weights_id]}
                ]
        return []

    async def wait_ready(self, timeout_s: float) -> None:
        await wait_all_ready(self.workers, timeout_s)

    def all_ready(self) -> bool:
        return all_ready(self.workers)

    def closing(self) -> None:
        for lane in self.workers:
            lane.closing()

    def stop(self) -> None:
        if self._describing is not None:
            self._describing.cancel()
        for lane in self.workers:
            lane.stop()
