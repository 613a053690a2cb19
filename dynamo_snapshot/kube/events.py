"""Kubernetes Events for the objects a controller works on (events.k8s.io/v1, shown by `kubectl describe`).

    recorder = EventRecorder(client, controller="nvidia.com/dynamo-snapshot-operator")
    await recorder.normal(checkpoint, "JobCreated", "created checkpoint job ckpt-abc")
    await recorder.warning(checkpoint, "BackoffLimitIgnored", "job.backoffLimit is deprecated and ignored")

Recording never raises: an event is a courtesy, and failing a reconcile over one would be worse than
missing it (failures are logged). The same event again within six minutes is counted on the first one
(`series.count`) instead of making a new object, as client-go's recorder does.

While `run` serves the recorder (a task of the controller's task group), recording only queues: a
sender writes the events in order, off the reconciles' path, as client-go's broadcaster does - an
event write used to be one of three sequential API calls of each checkpoint's first reconcile. The
queue holds `queue_size` events; one more is dropped and logged (a burst must not grow memory without
bound). Cancelled, the sender still writes what is queued, for at most `drain_s`. Without a running
sender (tests, one-shot tools) an event is written before `event` returns.

    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
"""

from __future__ import annotations

import socket
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectSendStream

from dynamo_snapshot.kube.client import Client
from dynamo_snapshot.kube.errors import KubeError, NotFound
from dynamo_snapshot.kube.resources import EVENTS_V1, meta

__all__ = ["EventRecorder", "object_reference"]

log = structlog.get_logger("dynamo_snapshot.kube.events")

_SERIES_WINDOW = 360.0
_MAX_NOTE = 1024


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def object_reference(obj: Any) -> dict[str, str]:
    """An ObjectReference (apiVersion, kind, namespace, name, uid, resourceVersion) of a dict or struct."""
    m = meta(obj)
    if isinstance(obj, dict):
        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    else:
        api_version, kind = getattr(obj, "api_version", ""), getattr(obj, "kind", "")
    if isinstance(m, dict):
        values = (m.get("namespace"), m.get("name"), m.get("uid"), m.get("resourceVersion"))
    else:
        values = (m.namespace, m.name, m.uid, m.resource_version)
    ref = {"apiVersion": api_version, "kind": kind}
    ref.update({f: v for f, v in zip(("namespace", "name", "uid", "resourceVersion"), values, strict=True) if v})
    return ref


class EventRecorder:
    def __init__(self, client: Client, *, controller: str, instance: str | None = None, cache_size: int = 4096,
                 queue_size: int = 1000, drain_s: float = 2.0):
        """`controller`: the reportingController (`nvidia.com/dynamo-snapshot-operator`); `instance`: this
        process (the pod or host name by default)."""
        self.client = client
        self.controller = controller
        self.instance = instance or socket.gethostname()
        self.cache_size = cache_size
        self.queue_size, self.drain_s = queue_size, drain_s
        self.dropped = 0
        self._series: OrderedDict[tuple[str, ...], tuple[str, str, int, float]] = OrderedDict()
        self._queue: MemoryObjectSendStream[tuple[Any, ...]] | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the recorder until cancelled: events are queued and written here, one at a time."""
        send, receive = anyio.create_memory_object_stream[tuple[Any, ...]](self.queue_size)
        self._queue = send
        task_status.started()
        try:
            async for queued in receive:
                await self._record(*queued)
        finally:
            self._queue = None
            send.close()
            with anyio.move_on_after(self.drain_s, shield=True):
                await self._drain(receive)
            receive.close()

    async def _drain(self, receive: Any) -> None:
        while True:
            try:
                queued = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await self._record(*queued)

    async def normal(self, obj: Any, reason: str, note: str, *, action: str = "", related: Any = None) -> None:
        await self.event(obj, "Normal", reason, note, action=action, related=related)

    async def warning(self, obj: Any, reason: str, note: str, *, action: str = "", related: Any = None) -> None:
        await self.event(obj, "Warning", reason, note, action=action, related=related)

    async def event(self, obj: Any, type: str, reason: str, note: str, *, action: str = "",
                    related: Any = None) -> None:
        """Record an event about `obj` (type Normal or Warning; action defaults to the reason)."""
        regarding = object_reference(obj)
        # the API server counts bytes, not characters
        note = note.encode()[:_MAX_NOTE].decode(errors="ignore")
        action = action or reason
        related_ref = None if related is None else object_reference(related)
        queued = (regarding, type, reason, note, action, related_ref)
        if self._queue is None:
            await self._record(*queued)
            return
        try:
            self._queue.send_nowait(queued)
        except anyio.WouldBlock:
            self.dropped += 1
            log.warning("event queue full, dropping event", queue_size=self.queue_size, reason=reason,
                        object=f"{regarding.get('namespace')}/{regarding.get('name')}", dropped=self.dropped)

    async def _record(self, regarding: dict[str, str], type: str, reason: str, note: str, action: str,
                      related: dict[str, str] | None) -> None:
        namespace = regarding.get("namespace") or "default"
        key = (regarding.get("uid") or f"{namespace}/{regarding.get('name')}", type, reason, action, note)
        now = time.monotonic()
        try:
            previous = self._series.get(key)
            if previous is not None and now - previous[3] < _SERIES_WINDOW:
                name, ns, count, first = previous
                try:
                    await self.client.patch(EVENTS_V1, name, {"series": {"count": count + 1,
                                                                         "lastObservedTime": _now()}}, ns)
                    self._remember(key, (name, ns, count + 1, first))
                    return
                except NotFound:
                    pass  # deleted (events expire after an hour by default): record a new one
            body: dict[str, Any] = {
                "apiVersion": "events.k8s.io/v1", "kind": "Event",
                "metadata": {"name": f"{regarding.get('name', 'object')}.{uuid.uuid4().hex[:16]}",
                             "namespace": namespace},
                "eventTime": _now(), "reportingController": self.controller,
                "reportingInstance": self.instance, "action": action, "reason": reason, "note": note,
                "type": type, "regarding": regarding,
            }
            if related is not None:
                body["related"] = related
            created = await self.client.create(EVENTS_V1, body, namespace)
            self._remember(key, (created["metadata"]["name"], namespace, 1, now))
        except KubeError as err:
            log.warning("could not record event", object=f"{namespace}/{regarding.get('name')}",
                        kind=regarding.get("kind"), reason=reason, error=str(err))

    def _remember(self, key: tuple[str, ...], value: tuple[str, str, int, float]) -> None:
        self._series[key] = value
        self._series.move_to_end(key)
        while len(self._series) > self.cache_size:
            self._series.popitem(last=False)
