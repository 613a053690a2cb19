"""The controller runner: informers put keys on a rate-limited queue, N workers reconcile them.

    async def reconcile(key: ObjectKey) -> Result | None:
        obj = checkpoints.store.get_by_name(key.namespace, key.name)
        ...
        return Result(requeue_after=30)            # or None: done until something changes

    ctrl = Controller("checkpoint", reconcile, workers=4)
    ctrl.watch(checkpoints)                            # the object's own key
    ctrl.watch(jobs, mapper=owner_keys("DynamoCheckpoint"))   # the owner's key
    async with anyio.create_task_group() as tg:
        tg.start_soon(factory.run)
        tg.start_soon(ctrl.run)                        # waits for its informers to sync first

Outcomes, as controller-runtime's: an exception is logged with the key and the key is retried with
backoff (5 ms doubling to 1000 s per key, 10/s overall; a failure because the server was away -
unreachable, 429, 5xx - is not counted against the overall 10/s, so an API server restart leaves no
debt); `Result(requeue=True)` retries with backoff without an error; `Result(requeue_after=s)` comes back
after s seconds, backoff reset; anything else resets the key's backoff. A key is never reconciled by two
workers at once, and a key that changes while it is reconciled is reconciled once more afterwards, so
reconcile always sees the latest state.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import structlog

from dynamo_snapshot.kube import metrics
from dynamo_snapshot.kube.errors import ApiError, TooManyRequests, TransportError
from dynamo_snapshot.kube.informer import Informer
from dynamo_snapshot.kube.resources import ObjectKey, object_key, owner_references
from dynamo_snapshot.kube.workqueue import RateLimiter, ShutDown, WorkQueue

__all__ = ["Controller", "Mapper", "Reconcile", "Result", "generation_changed", "owner_keys"]

log = structlog.get_logger("dynamo_snapshot.kube.controller")


@dataclass(frozen=True, slots=True)
class Result:
    requeue: bool = False
    requeue_after: float | None = None


Reconcile = Callable[[Any], Awaitable[Result | None]]
Mapper = Callable[[Any], Iterable[Hashable]]


def owner_keys(kind: str, *, controller_only: bool = True) -> Mapper:
    """A mapper to the keys of an object's owners of `kind` (its controller only, by default)."""
    def mapper(obj: Any) -> list[ObjectKey]:
        namespace = object_key(obj).namespace
        return [ObjectKey(namespace, ref["name"]) for ref in owner_references(obj)
                if ref.get("kind") == kind and (ref.get("controller") or not controller_only)]
    return mapper


def server_away(err: BaseException) -> bool:
    """A failure that says the API server was unreachable or overloaded, not that this key is wrong."""
    return isinstance(err, TransportError | TooManyRequests) or (
        isinstance(err, ApiError) and err.status in (500, 502, 503, 504))


def generation_changed(old: Any, new: Any) -> bool:
    """An update predicate: only spec changes (metadata.generation moved), as controller-runtime's."""
    def generation(obj: Any) -> int:
        m = obj["metadata"] if isinstance(obj, dict) else obj.metadata
        return (m.get("generation") if isinstance(m, dict) else m.generation) or 0
    return generation(old) != generation(new)


class Controller:
    def __init__(self, name: str, reconcile: Reconcile, *, workers: int = 1,
                 rate_limiter: RateLimiter | None = None):
        if workers < 1:
            raise ValueError("a controller needs at least one worker")
        self.name = name
        self.reconcile = reconcile
        self.workers = workers
        self.queue: WorkQueue[Hashable] = WorkQueue(name, rate_limiter=rate_limiter)
        self._informers: list[Informer[Any]] = []
        self._log = log.bind(controller=name)
        self._total = {r: metrics.RECONCILE_TOTAL.labels(name, r) for r in
                       ("success", "error", "requeue", "requeue_after")}
        self._errors = metrics.RECONCILE_ERRORS.labels(name)
        self._time = metrics.RECONCILE_TIME.labels(name)

    # -- sources ---------------------------------------------------------------------------------------
    def watch(self, informer: Informer[Any], *, mapper: Mapper | None = None,
              update_predicate: Callable[[Any, Any], bool] | None = None) -> None:
        """Enqueue keys for the informer's events: the object's own key, or what `mapper` returns.
        `update_predicate(old, new)` filters updates (resyncs, where old is new, always pass)."""
        to_keys: Mapper = mapper if mapper is not None else (lambda obj: (object_key(obj),))

        def enqueue(obj: Any) -> None:
            for key in to_keys(obj):
                self.queue.add(key)

        def on_update(old: Any, new: Any) -> None:
            if update_predicate is None or old is new or update_predicate(old, new):
                enqueue(new)

        informer.add_handler(on_add=enqueue, on_update=on_update, on_delete=enqueue)
        self._informers.append(informer)

    def enqueue(self, key: Hashable) -> None:
        self.queue.add(key)

    def enqueue_after(self, key: Hashable, delay: float) -> None:
        self.queue.add_after(key, delay)

    # -- running ---------------------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Wait for the watched informers to sync, then reconcile until cancelled (or the queue is shut
        down and drained). A controller runs once: after leadership is lost, build a new one."""
        for informer in self._informers:
            await informer.wait_synced()
        self._log.info("controller started", workers=self.workers)
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.workers):
                    tg.start_soon(self._worker)
                task_status.started()
        finally:
            self.queue.shutdown()
            self._log.info("controller stopped")

    async def _worker(self) -> None:
        while True:
            try:
                key = await self.queue.get()
            except ShutDown:
                return
            try:
                await self._reconcile(key)
            finally:
                self.queue.done(key)

    async def _reconcile(self, key: Hashable) -> None:
        started = time.monotonic()
        try:
            result = await self.reconcile(key)
        except Exception as err:
            self._time.observe(time.monotonic() - started)
            self._errors.inc()
            self._total["error"].inc()
            fields = {"namespace": key.namespace, "name": key.name} if isinstance(key, ObjectKey) else {}
            self._log.error("reconcile failed", key=str(key), **fields, error=str(err),
                            error_type=type(err).__name__, retries=self.queue.num_requeues(key), exc_info=err)
            self.queue.add_rate_limited(key, budget=not server_away(err))
            return
        self._time.observe(time.monotonic() - started)
        if result is not None and result.requeue_after is not None and result.requeue_after > 0:
            self._total["requeue_after"].inc()
            self.queue.forget(key)
            self.queue.add_after(key, result.requeue_after)
        elif result is not None and result.requeue:
            self._total["requeue"].inc()
            self.queue.add_rate_limited(key)
        else:
            self._total["success"].inc()
            self.queue.forget(key)
