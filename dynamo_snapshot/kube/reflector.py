"""The reflector: LIST, then WATCH from the list's resourceVersion, forever, as client-go's `cache.Reflector`.

- The first LIST asks for resourceVersion "0" (served from the API server's watch cache), paginated.
- WATCH from the list's resourceVersion with bookmarks and a random `timeoutSeconds` (5-10 minutes, so
  that many clients do not reconnect together). A stream that ends is watched again from the last
  resourceVersion seen; bookmarks advance it without an object changing.
- 410 Gone ("too old resource version"), in the HTTP status or as an ERROR event in the stream, means the
  server no longer has history from there: relist. A relist asks for "not older than" the last
  resourceVersion seen (the watch cache again); if even that is gone, a consistent list ("").
- A watch that cannot connect (refused, reset, timed out) is retried from the same resourceVersion: the
  server is probably restarting, and its history may still be there. Other errors relist.
- Every failure waits first: about 0.8 s doubling to 30 s with jitter, starting over after two minutes
  without failures or after a watch stream that worked. A 410 is the exception: the server answered, so
  the relist is at once (only a second 410 before a list succeeded waits).

What the reflector learns goes to a sink (the informer): a whole list (`on_list`), one event
(`on_event`), or a bookmark (`on_bookmark`). Objects are plain dicts or the msgspec struct type given
(decoded by `decode`, when given, from the object's raw JSON: `api.decode_dgd` keeps what the struct drops);
objects that do not fit the type are left out of the cache, with a warning, as if a selector excluded them,
unless `on_mismatch` gives a stand-in for them (the controllers' `api.Malformed`, which names the field).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import anyio
import msgspec
import structlog

from dynamo_snapshot.kube import metrics
from dynamo_snapshot.kube.client import Client, decoder
from dynamo_snapshot.kube.errors import ApiError, Expired, TooManyRequests, TransportError, is_expired
from dynamo_snapshot.kube.resources import Resource

__all__ = ["Backoff", "Reflector", "ReflectorSink", "ReflectorStats", "Tombstone", "strip_managed_fields"]

log = structlog.get_logger("dynamo_snapshot.kube.reflector")


class ReflectorSink(Protocol):
    def on_list(self, objects: list[Any], resource_version: str) -> None: ...

    def on_event(self, event_type: str, obj: Any, resource_version: str) -> None: ...

    def on_bookmark(self, resource_version: str) -> None: ...


class Backoff:
    """Exponential backoff with jitter that starts over after a quiet period (client-go's backoff manager)."""

    def __init__(self, initial: float = 0.8, cap: float = 30.0, factor: float = 2.0, jitter: float = 0.25,
                 reset_after: float = 120.0, clock: Callable[[], float] = time.monotonic):
        self.initial, self.cap, self.factor, self.jitter, self.reset_after = initial, cap, factor, jitter, reset_after
        self.clock = clock
        self._next = initial
        self._last: float | None = None

    def reset(self) -> None:
        """Start over from the initial delay (the connection worked again)."""
        self._next = self.initial
        self._last = None

    def next_delay(self) -> float:
        now = self.clock()
        if self._last is not None and now - self._last > self.reset_after:
            self._next = self.initial
        self._last = now
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay * (1.0 + self.jitter * random.random())


@dataclass
class ReflectorStats:
    lists: dict[str, int] = field(default_factory=dict)  # by reason: initial, expired, error
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    expired: int = 0  # 410 Gone answers (watch or list)
    errors: int = 0


def strip_managed_fields(obj: Any) -> Any:
    """The default transform of dict objects: drop metadata.managedFields (often half an object's size)."""
    if isinstance(obj, dict):
        metadata = obj.get("metadata")
        if metadata:
            metadata.pop("managedFields", None)
    return obj


class Tombstone(NamedTuple):
    """A DELETED event for an object known only by its store key (it stopped fitting the informer's type)."""

    key: str


class _Key(msgspec.Struct):
    class _Meta(msgspec.Struct):
        name: str = ""
        namespace: str = ""

    metadata: _Meta = msgspec.field(default_factory=_Meta)


class Reflector:
    def __init__(self, client: Client, resource: Resource, sink: ReflectorSink, *, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None, type: Any = Any,
                 transform: Callable[[Any], Any] | None = None, decode: Callable[[bytes], Any] | None = None,
                 on_mismatch: Callable[[bytes, msgspec.ValidationError], Any] | None = None, page_size: int = 500,
                 watch_timeout: tuple[float, float] = (300.0, 600.0), backoff: Backoff | None = None,
                 name: str | None = None):
        self.client = client
        self.resource = resource
        self.sink = sink
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.type = type
        self.transform = transform
        self.decode = decode if decode is not None or type is Any else decoder(type).decode
        self.on_mismatch = on_mismatch
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.name = name or f"{resource}{'/' + namespace if namespace else ''}"
        self.stats = ReflectorStats()
        self._rv = ""
        self._rv_unavailable = False
        self._log = log.bind(reflector=self.name, resource=str(resource), namespace=namespace or "*")

    @property
    def last_sync_resource_version(self) -> str:
        """The resourceVersion of the last list, event or bookmark seen."""
        return self._rv

    # -- the loop --------------------------------------------------------------------------------------
    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """List and watch until cancelled. With `tg.start(reflector.run)`, returns once the first list is in."""
        need_list, reason, started = True, "initial", False
        expired_in_a_row = False
        while True:
            try:
                if need_list:
                    await self._list(reason)
                    need_list = False
                    expired_in_a_row = False
                    if not started:
                        started = True
                        task_status.started()
                if await self._watch():
                    self.backoff.reset()  # the server answered a whole stream: failures start over
                    continue  # a stream that ran its course: watch again at once
                self._log.debug("watch ended at once without events", resource_version=self._rv)
            except Exception as err:  # cancellation is not an Exception: it passes
                self.stats.errors += 1
                if is_expired(err):
                    self.stats.expired += 1
                    need_list, reason = True, "expired"
                    self._log.info("resource version expired, relisting", resource_version=self._rv, error=str(err))
                    if not expired_in_a_row:
                        # The server answered: it is up, only its history is gone. Relist now, not after a
                        # backoff grown while it was away (a second 410 in a row does wait).
                        expired_in_a_row = True
                        continue
                elif isinstance(err, TransportError | TooManyRequests) or (
                        isinstance(err, ApiError) and err.status >= 500 and not need_list):
                    # The server is away or busy: its history may still be there when it is back.
                    self._log.warning("watch failed, retrying", resource_version=self._rv, error=str(err),
                                      listing=need_list)
                else:
                    if not need_list:
                        reason = "error"
                    need_list = True
                    self._log.warning("list/watch failed", resource_version=self._rv, error=str(err),
                                      error_type=type(err).__name__)
            await anyio.sleep(self.backoff.next_delay())

    async def _list(self, reason: str) -> None:
        if self._rv_unavailable:
            rv, match = "", None  # a consistent read from etcd
        elif not self._rv:
            rv, match = "0", None  # anything the watch cache has
        else:
            rv, match = self._rv, "NotOlderThan"  # never go back in time
        metrics.REFLECTOR_LISTS.labels(self.name, reason).inc()
        self.stats.lists[reason] = self.stats.lists.get(reason, 0) + 1
        try:
            objects, list_rv = await self._list_pages(rv, match)
        except ApiError as err:
            if not (is_expired(err) or _too_large_resource_version(err)):
                raise
            self.stats.expired += 1
            self._rv_unavailable = True
            self._log.info("list at resource version unavailable, listing consistently", resource_version=rv,
                           error=str(err))
            objects, list_rv = await self._list_pages("", None)
        self._rv_unavailable = False
        self._rv = list_rv
        self._log.debug("listed", objects=len(objects), resource_version=list_rv, reason=reason)
        self.sink.on_list(objects, list_rv)

    async def _list_pages(self, rv: str, match: str | None) -> tuple[list[Any], str]:
        raw = self.type is not Any
        selectors = {"label_selector": self.label_selector, "field_selector": self.field_selector}
        page = await self.client.list(self.resource, self.namespace, limit=self.page_size, resource_version=rv,
                                      resource_version_match=match, type=msgspec.Raw if raw else Any, **selectors)
        list_rv, items, token = page.resource_version, page.items, page.continue_token
        while token:
            try:
                page = await self.client.list(self.resource, self.namespace, limit=self.page_size,
                                              continue_token=token, type=msgspec.Raw if raw else Any, **selectors)
            except Expired:
                # The continue token outlived the server's history: one unpaginated consistent list.
                page = await self.client.list(self.resource, self.namespace, type=msgspec.Raw if raw else Any,
                                              **selectors)
                list_rv, items = page.resource_version, page.items
                break
            items.extend(page.items)
            token = page.continue_token
        objects = []
        for item in items:
            obj = self._decode(item)
            if obj is not None:
                objects.append(obj)
        return objects, list_rv

    def _decode(self, item: Any) -> Any:
        """An object as the sink wants it, or None if it does not fit the type."""
        if self.type is not Any:
            try:
                item = self.decode(item)
            except msgspec.ValidationError as err:
                stand_in = self.on_mismatch(item, err) if self.on_mismatch is not None else None
                if stand_in is not None:
                    return stand_in
                key = decoder(_Key).decode(item).metadata
                self._log.warning("object does not fit its type; left out of the cache",
                                  object=f"{key.namespace}/{key.name}", type=getattr(self.type, "__name__", ""),
                                  error=str(err))
                return None
        return self.transform(item) if self.transform is not None else item

    async def _watch(self) -> bool:
        """One watch stream. True if it delivered events or lasted; False if it ended at once, empty."""
        timeout = int(random.uniform(*self.watch_timeout))
        started, delivered = time.monotonic(), False
        self.stats.watches += 1
        metrics.REFLECTOR_WATCHES.labels(self.name).inc()
        events_counter = metrics.REFLECTOR_EVENTS
        async with self.client.watch(self.resource, self.namespace, resource_version=self._rv,
                                     label_selector=self.label_selector, field_selector=self.field_selector,
                                     timeout_seconds=timeout, allow_bookmarks=True,
                                     type=msgspec.Raw if self.type is not Any else Any) as events:
            async for event in events:
                delivered = True
                events_counter.labels(self.name, event.type).inc()
                if event.type == "BOOKMARK":
                    self.stats.bookmarks += 1
                    self._rv = event.resource_version
                    self.sink.on_bookmark(event.resource_version)
                    continue
                self.stats.events += 1
                obj = self._decode(event.object)
                if obj is None:  # no longer fits the type: gone from the cache
                    key = decoder(_Key).decode(event.object).metadata
                    self.sink.on_event("DELETED", Tombstone(f"{key.namespace}/{key.name}" if key.namespace
                                                            else key.name), event.resource_version)
                else:
                    self.sink.on_event(event.type, obj, event.resource_version)
                self._rv = event.resource_version
        return delivered or time.monotonic() - started >= 1.0


def _too_large_resource_version(err: ApiError) -> bool:
    """The server is behind the resourceVersion asked for (a restarted or lagging API server)."""
    causes = err.details.get("causes") or []
    return any(c.get("reason") == "ResourceVersionTooLarge" for c in causes if isinstance(c, dict)) or \
        "Too large resource version" in err.message
