"""Informers against the real control plane: handlers, indexes, snapshots, resync, typed caches, bookmarks,
an expired resourceVersion, and a kube-apiserver killed and restarted under a stream of writes."""

from __future__ import annotations

import functools
import random

import anyio
import msgspec
import pytest

from dynamo_snapshot.api import ObjectMeta
from dynamo_snapshot.kube import (
    CONFIGMAPS,
    AlreadyExists,
    Client,
    Conflict,
    Informer,
    NotFound,
    TransportError,
    index_by_label,
    store_key,
)
from dynamo_snapshot.kube.reflector import Backoff, Reflector
from tests.kube.support import View

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def cm(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "data": {"v": "0"}}


async def server_view(client: Client, namespace: str) -> dict[str, str]:
    listed = await client.list(CONFIGMAPS, namespace)  # a consistent read, from etcd
    return {store_key(o): o["metadata"]["resourceVersion"] for o in listed.items}


async def wait_for_marker(client: Client, informer: Informer, namespace: str, name: str = "zz-marker") -> None:
    """Watch events arrive in order: once an object written last is in the cache, everything before is too."""
    await client.create(CONFIGMAPS, cm(name), namespace)
    with anyio.fail_after(60):
        await informer.wait_until(lambda: f"{namespace}/{name}" in informer.store)


async def test_handlers_indexes_snapshots_and_resync(client: Client, namespace):
    await client.create(CONFIGMAPS, cm("a", app="web"), namespace)
    await client.create(CONFIGMAPS, cm("b", app="db"), namespace)
    informer = Informer(client, CONFIGMAPS, namespace=namespace, indexers={"app": index_by_label("app")})
    view = View(informer)
    async with anyio.create_task_group() as tg:
        await tg.start(informer.run)
        assert informer.has_synced
        # The first list is served from the API server's watch cache, which may lag a write made a moment
        # ago (as in client-go); what it missed arrives as watch events, in order.
        await wait_for_marker(client, informer, namespace, name="zz-synced")
        assert {f"{namespace}/a", f"{namespace}/b"} <= set(view.objects)
        assert "managedFields" not in informer.store.get(f"{namespace}/a")["metadata"]
        before = informer.store.snapshot()

        await client.create(CONFIGMAPS, cm("c", app="web"), namespace)
        await client.patch(CONFIGMAPS, "a", {"data": {"v": "1"}}, namespace)
        await client.delete(CONFIGMAPS, "b", namespace)
        await wait_for_marker(client, informer, namespace)

        assert sorted(o["metadata"]["name"] for o in informer.store.by_index("app", "web")) == ["a", "c"]
        assert informer.store.by_index("app", "db") == []
        assert sorted(before.index_keys("app", "db")) == [f"{namespace}/b"]  # the snapshot did not move
        assert view.objects == await server_view(client, namespace)
        assert view.events("delete") == [f"{namespace}/b"] and view.errors == []

        late: list[str] = []
        informer.add_handler(on_add=lambda o: late.append(store_key(o)))  # told of what is already cached
        assert sorted(late) == sorted(informer.store.keys())
        replayed: list[bool] = []
        informer.add_handler(on_update=lambda old, new: replayed.append(old is new))
        informer.resync()
        assert len(replayed) == len(informer.store) and all(replayed)

        async def not_a_plain_function(obj):  # pragma: no cover - never called
            pass
        with pytest.raises(TypeError):
            informer.add_handler(on_add=not_a_plain_function)
        tg.cancel_scope.cancel()


class Configured(msgspec.Struct):
    """A narrow type: only ConfigMaps with `data.mode` fit; the others stay out of the cache."""

    class Data(msgspec.Struct):
        mode: str

    metadata: ObjectMeta
    data: Data


async def test_typed_cache_across_namespaces_with_field_selector(client: Client, namespace):
    name = f"typed-{namespace}"  # unique across the cluster
    informer: Informer[Configured] = Informer(client, CONFIGMAPS, field_selector=f"metadata.name={name}",
                                              type=Configured)
    view = View(informer)
    async with anyio.create_task_group() as tg:
        await tg.start(informer.run)
        assert len(informer.store) == 0
        await client.create(CONFIGMAPS, {"metadata": {"name": name}, "data": {"other": "x"}}, namespace)
        await client.patch(CONFIGMAPS, name, {"data": {"mode": "fast"}}, namespace)
        key = f"{namespace}/{name}"
        with anyio.fail_after(30):
            await informer.wait_until(lambda: key in informer.store)
        cached = informer.store.get(key)
        assert isinstance(cached, Configured) and cached.data.mode == "fast"
        await client.patch(CONFIGMAPS, name, {"data": {"mode": None}}, namespace)  # no longer fits: leaves
        with anyio.fail_after(30):
            await informer.wait_until(lambda: key not in informer.store)
        assert view.log == [("add", key), ("delete", key)] and view.errors == []
        tg.cancel_scope.cancel()


async def test_a_typed_informer_caches_what_its_decode_makes_of_the_raw_json_listed_and_watched(client: Client,
                                                                                                 namespace):
    seen: list[bytes] = []

    def decode(raw: bytes) -> Configured:  # keeps what the struct drops, as api.decode_dgd does
        seen.append(bytes(raw))
        return msgspec.json.decode(raw, type=Configured)

    await client.create(CONFIGMAPS, {"metadata": {"name": "listed"}, "data": {"mode": "a", "extra": "1"}}, namespace)
    informer: Informer[Configured] = Informer(client, CONFIGMAPS, namespace=namespace, type=Configured,
                                              decode=decode)
    async with anyio.create_task_group() as tg:
        await tg.start(informer.run)
        assert any(b'"extra":"1"' in raw for raw in seen)  # kube-root-ca.crt is listed too (and left out)
        assert informer.store.get(f"{namespace}/listed").data.mode == "a"
        await client.create(CONFIGMAPS, {"metadata": {"name": "watched"}, "data": {"mode": "b"}}, namespace)
        with anyio.fail_after(30):
            await informer.wait_until(lambda: f"{namespace}/watched" in informer.store)
        assert b'"name":"watched"' in seen[-1] and informer.store.get(f"{namespace}/watched").data.mode == "b"
        tg.cancel_scope.cancel()


async def test_bookmarks_advance_the_resource_version(client: Client, namespace):
    # The server sends a bookmark about 2 s before a watch's timeout: a 3 s watch gets one at once.
    informer = Informer(client, CONFIGMAPS, namespace=namespace, label_selector="matches=nothing",
                        watch_timeout=(3, 3))
    async with anyio.create_task_group() as tg:
        await tg.start(informer.run)
        listed = int(informer.reflector.last_sync_resource_version)
        # A write the informer does not watch moves the server's resourceVersion past the list's.
        elsewhere = await client.create(CONFIGMAPS, cm("not-selected"), namespace)
        target = int(elsewhere["metadata"]["resourceVersion"])
        assert target > listed
        with anyio.fail_after(30):
            await informer.wait_until(lambda: int(informer.reflector.last_sync_resource_version) >= target)
        stats = informer.reflector.stats
        assert stats.bookmarks >= 1 and stats.events == 0 and len(informer.store) == 0
        assert informer.store.resource_version == informer.reflector.last_sync_resource_version
        tg.cancel_scope.cancel()


async def expire_behind(local_cluster, proxy) -> None:
    """Expire the cut-off informer's resourceVersion: compact etcd's history and restart the API server,
    whose watch cache then starts after it (its next watch gets 410 Gone); then let the informer back."""
    local_cluster.compact_etcd()
    await anyio.to_thread.run_sync(functools.partial(local_cluster.restart_component, "kube-apiserver", kill=True))
    proxy.restore()


async def test_expired_resource_version_relists_and_reports_deletes(local_cluster, cluster_config, client,
                                                                   namespace, proxy):
    for name in "abcd":
        await client.create(CONFIGMAPS, cm(name), namespace)
    async with Client(proxy.config_through(cluster_config)) as remote:
        informer = Informer(remote, CONFIGMAPS, namespace=namespace)
        view = View(informer)
        async with anyio.create_task_group() as tg:
            await tg.start(informer.run)
            assert {f"{namespace}/{n}" for n in "abcd"} <= set(view.objects)

            await proxy.cut()  # the informer is partitioned from the server; everyone else is not
            await client.delete(CONFIGMAPS, "b", namespace)
            await client.patch(CONFIGMAPS, "c", {"data": {"v": "changed"}}, namespace)
            await client.create(CONFIGMAPS, cm("e"), namespace)
            await expire_behind(local_cluster, proxy)

            await wait_for_marker(client, informer, namespace)
            assert informer.reflector.stats.lists.get("expired", 0) >= 1
            assert view.events("delete") == [f"{namespace}/b"]  # reported by the relist
            assert f"{namespace}/c" in view.events("update") and f"{namespace}/e" in view.events("add")
            assert view.objects == await server_view(client, namespace)
            assert view.errors == []
            tg.cancel_scope.cancel()


class _DelaysSeen(Backoff):
    """A real backoff that notes, for every wait, whether a 410 was still waiting for its relist."""

    def __init__(self) -> None:
        super().__init__(initial=0.3, cap=0.3)
        self.reflector: Reflector | None = None
        self.waits_before_relist = 0

    def next_delay(self) -> float:
        assert self.reflector is not None
        stats = self.reflector.stats
        if stats.expired > stats.lists.get("expired", 0):
            self.waits_before_relist += 1
        return super().next_delay()


async def test_a_410_after_an_apiserver_restart_relists_at_once_without_a_backoff(local_cluster, cluster_config,
                                                                                 client, namespace, proxy):
    await client.create(CONFIGMAPS, cm("a"), namespace)
    backoff = _DelaysSeen()
    async with Client(proxy.config_through(cluster_config)) as remote:
        informer = Informer(remote, CONFIGMAPS, namespace=namespace, backoff=backoff)
        backoff.reflector = informer.reflector
        view = View(informer)
        async with anyio.create_task_group() as tg:
            await tg.start(informer.run)
            await proxy.cut()
            await client.create(CONFIGMAPS, cm("b"), namespace)
            await expire_behind(local_cluster, proxy)
            await wait_for_marker(client, informer, namespace)
            assert informer.reflector.stats.lists.get("expired", 0) >= 1
            assert f"{namespace}/b" in view.objects
            assert backoff.waits_before_relist == 0  # the server answered 410: the relist did not wait
            tg.cancel_scope.cancel()


async def test_watch_survives_apiserver_kill_and_restart(local_cluster, client, namespace):
    informer = Informer(client, CONFIGMAPS, namespace=namespace)
    view = View(informer)
    names = [f"cm-{i}" for i in range(15)]
    rng = random.Random(7)
    restarted = anyio.Event()
    warmed_up = anyio.Event()
    written = {"before": 0, "after": 0}

    async def one_write() -> None:
        name = rng.choice(names)
        action = rng.choice(("create", "create", "update", "update", "delete"))
        try:
            if action == "create":
                await client.create(CONFIGMAPS, cm(name), namespace)
            elif action == "update":
                await client.patch(CONFIGMAPS, name, {"data": {"v": str(rng.random())}}, namespace)
            else:
                await client.delete(CONFIGMAPS, name, namespace)
        except (NotFound, AlreadyExists, Conflict):
            pass

    async def writer() -> None:
        while written["after"] < 60:
            try:
                await one_write()
            except TransportError:  # the server is down (the write may or may not have happened)
                await restarted.wait()
                continue
            written["after" if restarted.is_set() else "before"] += 1
            if written["before"] == 30:
                warmed_up.set()

    async with anyio.create_task_group() as tg:
        await tg.start(informer.run)
        async with anyio.create_task_group() as writes:
            writes.start_soon(writer)
            await warmed_up.wait()
            await anyio.to_thread.run_sync(functools.partial(local_cluster.stop_component, "kube-apiserver",
                                                             kill=True))
            await anyio.to_thread.run_sync(local_cluster.start_component, "kube-apiserver")
            restarted.set()
        await wait_for_marker(client, informer, namespace)
        assert view.objects == await server_view(client, namespace)  # nothing missed, no phantoms
        assert view.errors == []
        # The stream broke and was watched again: from where it was if the restarted server's watch cache
        # reaches back far enough, after a relist if not (410). Either way nothing is missed.
        assert informer.reflector.stats.errors >= 1 and informer.reflector.stats.watches >= 2
        tg.cancel_scope.cancel()
