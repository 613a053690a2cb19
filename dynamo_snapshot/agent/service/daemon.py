"""The snapshot agent daemon: watches the pods of its node that carry a checkpoint ID and runs the
checkpoints and restores they ask for (SPEC section 7).

    pods informer (spec.nodeName=<node>, label nvidia.com/snapshot-checkpoint-id[, one namespace])
      -> once synced: settle the checkpoints this node's previous agent was killed in (leftovers.py)
      -> controller (one reconcile per pod key) -> podwork.work_for(pod)
      -> an operation per checkpoint ID / container ID, at most one at a time each, in its own task

Operations run beside the controller, not in its workers, so a long dump never holds up other pods.
A stop (SIGTERM) stops taking new work and lets running operations finish for up to
``drain_timeout`` seconds; past that they are cancelled, and each still writes its ``failed`` verdict
and kills its workload (their failure paths are shielded) before the process exits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from dynamo_snapshot.agent.service import leftovers, podwork
from dynamo_snapshot.agent.service.operations import Operations, Outcome
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import PODS, Controller, InformerFactory, ObjectKey

log = structlog.get_logger(__name__)

RETRY_AFTER_S = 5.0
_REMEMBERED = 4096  # finished attempts kept in memory (the annotations are the durable record)


@dataclass
class _Running:
    kind: str
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class Agent:
    def __init__(self, factory: InformerFactory, operations: Operations, *, node_name: str,
                 namespace: str | None, workers: int = 2, drain_timeout: float = 90.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_outcome: Callable[[podwork.Work, Outcome], None] | None = None):
        self.operations = operations
        self.node_name = node_name
        self.namespace = namespace
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.on_outcome = on_outcome
        self.pods = factory.informer(PODS, namespace=namespace, label_selector=names.LABEL_CHECKPOINT_ID,
                                     field_selector=f"spec.nodeName={node_name}")
        self.controller = Controller("snapshot-agent", self.reconcile, workers=workers)
        self.controller.watch(self.pods)
        self.factory = factory
        self._running: dict[str, _Running] = {}
        self._finished: OrderedDict[str, Outcome] = OrderedDict()
        self._ready_seen: dict[str, float] = {}  # checkpoint work key -> when its Ready was first seen
        self._waiting: dict[str, set[ObjectKey]] = {}  # pods whose work waits for a running operation
        self._idle = anyio.Event()
        self._idle.set()
        self._operations_tg: anyio.abc.TaskGroup | None = None
        self.draining = False
        self.stopping = anyio.Event()  # set when a stop begins (running operations may still finish)

    @property
    def synced(self) -> bool:
        return self.pods.has_synced

    # -- deciding --------------------------------------------------------------------------------------------
    async def reconcile(self, key: ObjectKey) -> None:
        pod = self.pods.store.get_by_name(key.namespace, key.name)
        if pod is None or self.draining:
            return
        for work in podwork.work_for(pod):
            self._offer(work, key)

    @staticmethod
    def _attempt(work: podwork.Work) -> str:
        """What must never run twice: a checkpoint of one container, a restore into one container."""
        if isinstance(work, podwork.CheckpointWork):
            return f"{work.key}/{work.container_id}"
        return work.key

    def _offer(self, work: podwork.Work, pod_key: ObjectKey) -> None:
        attempt = self._attempt(work)
        if isinstance(work, podwork.CheckpointWork):
            self._ready_seen.setdefault(attempt, self.clock())
        if attempt in self._finished or self._operations_tg is None:
            return
        if work.key in self._running:
            self._waiting.setdefault(work.key, set()).add(pod_key)
            return
        running = _Running("checkpoint" if isinstance(work, podwork.CheckpointWork) else "restore")
        self._running[work.key] = running
        self._idle = anyio.Event()
        self._operations_tg.start_soon(self._operate, work, attempt, pod_key, running)

    # -- running ---------------------------------------------------------------------------------------------
    async def _operate(self, work: podwork.Work, attempt: str, pod_key: ObjectKey, running: _Running) -> None:
        started = self.clock()
        self.operations.metrics.in_flight.labels(running.kind).inc()
        outcome = Outcome.FAILED
        try:
            # Shielded: a stop lets the operation finish; only the drain deadline cancels it (running.scope).
            with anyio.CancelScope(shield=True):
                with running.scope:
                    if isinstance(work, podwork.CheckpointWork):
                        outcome = await self.operations.checkpoint(work, self._ready_seen.get(attempt, started))
                    else:
                        outcome = await self.operations.restore(work)
        except Exception:
            log.exception("operation failed unexpectedly", operation=running.kind, namespace=work.pod.namespace,
                          name=work.pod.name, container_id=work.container_id)
        finally:
            self.operations.metrics.in_flight.labels(running.kind).dec()
            del self._running[work.key]
            if not self._running:
                self._idle.set()
        if self.on_outcome is not None:
            self.on_outcome(work, outcome)
        # Pods whose work waited for this key (a second pod of the same checkpoint ID) are looked at again.
        for waiting in self._waiting.pop(work.key, set()):
            self.controller.enqueue(waiting)
        if outcome is Outcome.RETRY:
            self.controller.enqueue_after(pod_key, RETRY_AFTER_S)
            return
        self._ready_seen.pop(attempt, None)
        self._remember(attempt, outcome)
        if outcome in (Outcome.COMPLETED, Outcome.FAILED):
            self.operations.metrics.operations.labels(running.kind, outcome.value).inc()
            self.operations.metrics.duration.labels(running.kind).observe(self.clock() - started)

    def _remember(self, attempt: str, outcome: Outcome) -> None:
        self._finished[attempt] = outcome
        while len(self._finished) > _REMEMBERED:
            self._finished.popitem(last=False)

    async def _drain(self) -> None:
        """Let running operations finish, then cancel what is left (each still writes its verdict)."""
        self.draining = True
        self.stopping.set()
        if self._running:
            log.info("stopping: waiting for running operations", operations=sorted(self._running),
                     timeout_s=self.drain_timeout)
        with anyio.move_on_after(self.drain_timeout):
            await self._idle.wait()
        for key, running in list(self._running.items()):
            log.warning("stopping: cancelling a running operation", operation=key)
            running.scope.cancel()
        await self._idle.wait()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        log.info("snapshot agent watching pods", node=self.node_name, namespace=self.namespace or "(all)")
        async with anyio.create_task_group() as operations:
            self._operations_tg = operations
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(self.factory.run)
                    # before any new work: what this node's previous agent was killed in (leftovers.py)
                    if settled := await leftovers.settle(self.operations, self.pods.store.list()):
                        log.info("settled checkpoints the previous agent left", count=settled)
                    await tg.start(self.controller.run)
                    task_status.started()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._drain()
                self._operations_tg = None

    def running_operations(self) -> dict[str, Any]:
        return {key: running.kind for key, running in self._running.items()}
