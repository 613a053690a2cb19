"""Informers: a reflector feeding a store, and handlers told of every add, update and delete.

    pods = Informer(client, PODS, namespace="ns", label_selector="app=web")
    pods.add_handler(on_add=..., on_update=..., on_delete=...)
    async with anyio.create_task_group() as tg:
        await tg.start(pods.run)        # returns once the first list is in the store
        pods.store.by_index("namespace", "ns")

Handlers are plain functions called in order, in the informer's task, after the store has changed: keep
them short (put a key on a work queue) - a slow handler delays the cache. An exception in a handler is
logged and does not stop the informer. A relist (after the watch's history expired) tells handlers what
changed while the watch was away: adds, updates (when the resourceVersion moved) and deletes, the
latter with the last state the cache knew. A handler added after the informer synced first gets an add
for every object already cached. `resync_period` replays the cache as updates (old is new) without
calling the server, for controllers that want a periodic level-triggered pass.

`InformerFactory` shares one informer per (resource, namespace, selectors, type, decode) among controllers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import structlog

from dynamo_snapshot.kube.client import Client
from dynamo_snapshot.kube.reflector import Backoff, Reflector, Tombstone, strip_managed_fields
from dynamo_snapshot.kube.resources import Resource
from dynamo_snapshot.kube.store import IndexFunc, Store

__all__ = ["EventHandler", "Informer", "InformerFactory"]

T = TypeVar("T")
log = structlog.get_logger("dynamo_snapshot.kube.informer")
_DEFAULT = object()


@dataclass(eq=False)
class EventHandler(Generic[T]):
    on_add: Callable[[T], None] | None = None
    on_update: Callable[[T, T], None] | None = None
    on_delete: Callable[[T], None] | None = None


class _Changed:
    """Wakes waiters after every change; each re-checks its own condition."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self._event is None:
                self._event = anyio.Event()
            await self._event.wait()


class Informer(Generic[T]):
    def __init__(self, client: Client, resource: Resource, *, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None, type: Any = Any,
                 transform: Callable[[Any], Any] | object | None = _DEFAULT,
                 decode: Callable[[bytes], Any] | None = None,
                 on_mismatch: Callable[[bytes, Any], Any] | None = None,
                 indexers: Mapping[str, IndexFunc] | None = None, resync_period: float | None = None,
                 page_size: int = 500, watch_timeout: tuple[float, float] = (300.0, 600.0),
                 backoff: Backoff | None = None, name: str | None = None):
        """`type`: Any keeps plain dicts (managedFields stripped unless `transform` says otherwise); a
        msgspec struct type decodes into it (fields it does not declare are never kept: the cheapest cache).
        `decode(raw)`: for a typed informer, how an object's raw JSON becomes what is cached (default: msgspec
        into `type`); it raises msgspec.ValidationError for an object that does not fit.
        `on_mismatch(raw, error)`: the stand-in cached for an object that does not fit `type` (None: left out)."""
        if transform is _DEFAULT:
            transform = strip_managed_fields if type is Any else None
        self.resource = resource
        self.namespace = namespace
        self.store: Store[T] = Store(indexers=indexers)
        self.resync_period = resync_period
        self.reflector = Reflector(client, resource, self, namespace=namespace, label_selector=label_selector,
                                   field_selector=field_selector, type=type, transform=transform,  # type: ignore[arg-type]
                                   decode=decode, on_mismatch=on_mismatch,
                                   page_size=page_size, watch_timeout=watch_timeout, backoff=backoff, name=name)
        self.name = self.reflector.name
        self._handlers: list[EventHandler[T]] = []
        self._synced = False
        self._changed = _Changed()
        self._log = log.bind(informer=self.name)

    # -- handlers --------------------------------------------------------------------------------------
    def add_handler(self, on_add: Callable[[T], None] | None = None,
                    on_update: Callable[[T, T], None] | None = None,
                    on_delete: Callable[[T], None] | None = None) -> EventHandler[T]:
        for func in (on_add, on_update, on_delete):
            if func is not None and inspect.iscoroutinefunction(func):
                raise TypeError(f"{func!r}: informer handlers are plain functions; hand work to a queue")
        handler = EventHandler(on_add, on_update, on_delete)
        self._handlers.append(handler)
        if self._synced and on_add is not None:
            for obj in self.store.list():
                self._call(on_add, obj)
        return handler

    def remove_handler(self, handler: EventHandler[T]) -> None:
        self._handlers.remove(handler)

    def _call(self, func: Callable[..., None], *args: Any) -> None:
        try:
            func(*args)
        except Exception:
            self._log.exception("event handler failed", handler=getattr(func, "__qualname__", repr(func)),
                                object=self.store.key_func(args[-1]))

    def _added(self, obj: T) -> None:
        for handler in self._handlers:
            if handler.on_add is not None:
                self._call(handler.on_add, obj)

    def _updated(self, old: T, new: T) -> None:
        for handler in self._handlers:
            if handler.on_update is not None:
                self._call(handler.on_update, old, new)

    def _deleted(self, obj: T) -> None:
        for handler in self._handlers:
            if handler.on_delete is not None:
                self._call(handler.on_delete, obj)

    # -- the reflector's sink ------------------------------------------------------------------------------
    def on_list(self, objects: list[Any], resource_version: str) -> None:
        added, updated, deleted = self.store.replace(objects, resource_version)
        if self._synced and (added or updated or deleted):
            self._log.info("relist changed the cache", added=len(added), updated=len(updated),
                           deleted=len(deleted), resource_version=resource_version)
        for obj in deleted:
            self._deleted(obj)
        for obj in added:
            self._added(obj)
        for old, new in updated:
            self._updated(old, new)
        self._synced = True
        self._changed.notify()

    def on_event(self, event_type: str, obj: Any, resource_version: str) -> None:
        if event_type == "DELETED":
            key = obj.key if isinstance(obj, Tombstone) else self.store.key_func(obj)
            old = self.store.remove(key)
            if old is not None:  # a delete of something never seen would be a phantom to handlers
                self._deleted(old if isinstance(obj, Tombstone) else obj)
        else:
            old = self.store.put(obj)
            if old is None:
                self._added(obj)
            else:
                self._updated(old, obj)
        self.store.resource_version = resource_version
        self._changed.notify()

    def on_bookmark(self, resource_version: str) -> None:
        self.store.resource_version = resource_version
        self._changed.notify()

    # -- running -------------------------------------------------------------------------------------
    @property
    def has_synced(self) -> bool:
        """True once the first list is in the store and handlers have been told of it."""
        return self._synced

    async def wait_synced(self) -> None:
        await self._changed.wait_until(lambda: self._synced)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until `predicate()` holds; it is checked after every list, event and bookmark."""
        await self._changed.wait_until(predicate)

    def resync(self) -> None:
        """Replay every cached object to the update handlers (old is new), without calling the server."""
        for obj in self.store.list():
            self._updated(obj, obj)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List and watch until cancelled. With `tg.start(informer.run)`, returns once synced."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.reflector.run)
            task_status.started()
            if self.resync_period:
                while True:
                    await anyio.sleep(self.resync_period)
                    self.resync()


class InformerFactory:
    """One shared informer per (resource, namespace, selectors, type), started together.

    Informers asked for after `run` started are started at once (`wait_synced` on them as usual).
    """

    def __init__(self, client: Client, *, resync_period: float | None = None, **informer_options: Any):
        self.client = client
        self.resync_period = resync_period
        self.informer_options = informer_options
        self._informers: dict[tuple[Any, ...], Informer[Any]] = {}
        self._task_group: anyio.abc.TaskGroup | None = None

    def informer(self, resource: Resource, *, namespace: str | None = None, label_selector: str | None = None,
                 field_selector: str | None = None, type: Any = Any, decode: Callable[[bytes], Any] | None = None,
                 on_mismatch: Callable[[bytes, Any], Any] | None = None,
                 indexers: Mapping[str, IndexFunc] | None = None) -> Informer[Any]:
        key = (resource, namespace, label_selector, field_selector, type, decode, on_mismatch)
        informer = self._informers.get(key)
        if informer is None:
            informer = Informer(self.client, resource, namespace=namespace, label_selector=label_selector,
                                field_selector=field_selector, type=type, decode=decode, indexers=indexers,
                                on_mismatch=on_mismatch,
                                resync_period=self.resync_period, **self.informer_options)
            self._informers[key] = informer
            if self._task_group is not None:
                self._task_group.start_soon(informer.run)
        elif indexers:
            known = informer.store.indexers
            informer.store.add_indexers({k: v for k, v in indexers.items() if known.get(k) is not v})
        return informer

    @property
    def informers(self) -> list[Informer[Any]]:
        return list(self._informers.values())

    async def wait_synced(self) -> None:
        for informer in list(self._informers.values()):
            await informer.wait_synced()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every informer until cancelled. With `tg.start(factory.run)`, returns once all synced."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            try:
                for informer in list(self._informers.values()):
                    tg.start_soon(informer.run)
                await self.wait_synced()
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._task_group = None
