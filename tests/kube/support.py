"""Test helpers: a TCP proxy that partitions a client from the API server, a handler-built view of an
informer's objects that catches duplicate adds and phantom deletes, and a count of open sockets."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import anyio
import anyio.abc

from dynamo_snapshot.kube import ClusterConfig, Informer, resource_version, store_key


class FakeClock:
    """A clock that moves only when told (`clock.now += 1`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the API server. `cut()` drops every connection and refuses new ones
    until `restore()`: the client sees a broken network while the server stays up for everyone else."""

    def __init__(self, host: str, port: int):
        self.host, self.upstream_port = host, port
        self.port = 0
        self.connected = 0
        self._blocked = False
        self._scopes: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    def config_through(self, config: ClusterConfig) -> ClusterConfig:
        return dataclasses.replace(config, server=f"https://127.0.0.1:{self.port}")

    async def cut(self) -> None:
        """Drop every connection (returns once they are closed) and refuse new ones."""
        self._blocked = True
        for scope in list(self._scopes):
            scope.cancel()
        while self._scopes:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def restore(self) -> None:
        self._blocked = False

    async def _handle(self, downstream: anyio.abc.SocketStream) -> None:
        async with downstream:
            if self._blocked:
                return
            with anyio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    async with await anyio.connect_tcp(self.host, self.upstream_port) as upstream, \
                            anyio.create_task_group() as tg:
                        self.connected += 1
                        tg.start_soon(self._pipe, downstream, upstream, tg.cancel_scope)
                        await self._pipe(upstream, downstream, tg.cancel_scope)
                except OSError:
                    pass
                finally:
                    self._scopes.discard(scope)
                    if not self._scopes and self._idle is not None:
                        self._idle.set()
                        self._idle = None

    @staticmethod
    async def _pipe(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        try:
            async for chunk in src:
                await dst.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        scope.cancel()


class View:
    """What an informer's handlers have said, replayed into a dict of key -> resourceVersion.

    Mistakes a handler should never see (an add for a key it already has, an update or delete of a key it
    never had) are collected in `errors` rather than raised: the informer would only log them."""

    def __init__(self, informer: Informer[Any]):
        self.objects: dict[str, str] = {}
        self.log: list[tuple[str, str]] = []
        self.errors: list[str] = []
        informer.add_handler(self.on_add, self.on_update, self.on_delete)

    def on_add(self, obj: Any) -> None:
        key = store_key(obj)
        if key in self.objects:
            self.errors.append(f"add of {key}, already present")
        self.objects[key] = resource_version(obj)
        self.log.append(("add", key))

    def on_update(self, old: Any, new: Any) -> None:
        key = store_key(new)
        if key not in self.objects:
            self.errors.append(f"update of {key}, never added")
        elif self.objects[key] != resource_version(old):
            self.errors.append(f"update of {key} from {resource_version(old)}, last seen {self.objects[key]}")
        self.objects[key] = resource_version(new)
        self.log.append(("update", key))

    def on_delete(self, obj: Any) -> None:
        key = store_key(obj)
        if self.objects.pop(key, None) is None:
            self.errors.append(f"delete of {key}, never added")
        self.log.append(("delete", key))

    def events(self, kind: str) -> list[str]:
        return [key for k, key in self.log if k == kind]


def sockets_to(port: int) -> int:
    """How many TCP sockets this process holds open to `port` (from /proc: file descriptors and tcp tables)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count
