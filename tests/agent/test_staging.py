"""Pre-staging on the agent, against the real API server: a Ready checkpoint whose status.staging names this
node is fetched from PVC-like storage into the node cache, authenticated and checked compatible first, and
reported on the node's Lease; a deleted checkpoint, or one whose artifact version changed, is dropped from
the cache; and a restarted agent drops entries whose checkpoint no longer exists, keeping (not refetching)
the rest."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from dynamo_snapshot.agent.artifact import authn
from dynamo_snapshot.agent.artifact.manifest import Compatibility
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.service.metrics import AgentMetrics
from dynamo_snapshot.agent.service.staging import Stager, StagingSource
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, LEASES, Client, InformerFactory, NotFound

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

NODE = "staging-test-node"
HERE = Compatibility.of_this_node("4.1")


@pytest.fixture
def keyring(tmp_path: Path) -> authn.Keyring:
    authn.create_key(tmp_path / "keys", "k-staging")
    return authn.Keyring.from_directory(tmp_path / "keys")


def store_version(base: Path, checkpoint_id: str, keyring: authn.Keyring, *, version: str = "1",
                  compatibility: Compatibility = HERE) -> Path:
    """A promoted, sealed version on the storage (the PVC's layout)."""
    directory = base / checkpoint_id / names.VERSIONS_DIR / version
    directory.mkdir(parents=True)
    (directory / "core-1.img").write_bytes(checkpoint_id.encode() * 16)
    (directory / "pages-1.img").write_bytes(os.urandom(64 * 1024))
    authn.write_manifest(directory, {"checkpointID": checkpoint_id, "compatibility": compatibility.to_json()},
                         keyring)
    return directory


async def ready_checkpoint(client: Client, namespace: str, name: str, checkpoint_id: str, *,
                           nodes: list[str], version: str = "1") -> None:
    body = {"apiVersion": names.API_VERSION, "kind": names.CHECKPOINT_KIND,
            "metadata": {"name": name, "annotations": {names.ANN_ARTIFACT_VERSION: version}},
            "spec": {"identity": {"model": name, "backendFramework": "vllm"},
                     "job": {"podTemplateSpec": {"spec": {"containers": [{"name": "main", "image": "w:1"}]}}}}}
    await client.create(DYNAMO_CHECKPOINTS, body, namespace)
    await client.patch_status(DYNAMO_CHECKPOINTS, name, {"status": {
        "phase": "Ready", "checkpointID": checkpoint_id,
        "staging": {"artifactVersion": version, "nodes": nodes}}}, namespace)


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (plain or async) until it holds; the API server's state has no event to wait on."""
    with anyio.fail_after(30):
        while True:
            value = check()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await anyio.sleep(0.1)


class Running:
    def __init__(self, client: Client, namespace: str, cache: NodeCache, source: StagingSource | None):
        self.client, self.namespace, self.cache = client, namespace, cache
        self.registry = CollectorRegistry()
        self.stager = Stager(client, InformerFactory(client), cache, node_name=NODE, watched_namespace=namespace,
                             lease_namespace=namespace, source=source, metrics=AgentMetrics(self.registry))

    def cached(self) -> list[tuple[str, str]]:
        return sorted((e.checkpoint_id, e.version) for e in self.cache.entries())

    async def reported(self) -> list[dict[str, str]] | None:
        try:
            lease = await self.client.get(LEASES, names.STAGED_LEASE_PREFIX + NODE, self.namespace)
        except NotFound:
            return None
        assert lease["metadata"]["labels"][names.LABEL_STAGED_NODE] == NODE
        return json.loads(lease["metadata"]["annotations"][names.ANN_STAGED])

    async def wait_reported(self, entries: list[dict[str, str]]) -> None:
        async def reported() -> bool:
            return await self.reported() == entries

        await until(reported)

    async def wait_cached(self, entries: list[tuple[str, str]]) -> None:
        await until(lambda: self.cached() == entries)


async def run_stager(running: Running, body: Callable[[Running], Any]) -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(running.stager.checkpoints.run)
        tg.start_soon(running.stager.controller.run)
        await body(running)
        tg.cancel_scope.cancel()


async def test_a_ready_checkpoint_named_for_this_node_is_staged_reported_and_dropped_when_deleted(
        client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    store_version(base, "aaaa000000000001", keyring)
    store_version(base, "bbbb000000000002", keyring)
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    running = Running(client, namespace, cache, StagingSource(base, keyring, _here))
    await ready_checkpoint(client, namespace, "mine", "aaaa000000000001", nodes=[NODE, "other-node"])
    await ready_checkpoint(client, namespace, "elsewhere", "bbbb000000000002", nodes=["other-node"])

    async def body(r: Running) -> None:
        await r.wait_cached([("aaaa000000000001", "1")])
        await r.wait_reported([{"checkpointID": "aaaa000000000001", "version": "1"}])
        staged = r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "staged"})
        assert staged == 1 and r.registry.get_sample_value("snapshot_agent_staging_in_progress") == 0
        with cache.use("aaaa000000000001", "1", authn.open_manifest(
                base / "aaaa000000000001" / "versions" / "1", keyring)) as hit:
            assert hit is not None, "the staged entry is the one a restore of the stored version reads"
        await client.delete(DYNAMO_CHECKPOINTS, "mine", namespace)
        await r.wait_cached([])
        await r.wait_reported([])

    await run_stager(running, body)
    cache.close()


async def test_a_new_artifact_version_drops_the_cached_one_and_stages_the_new(client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    store_version(base, "cccc000000000003", keyring)
    store_version(base, "cccc000000000003", keyring, version="2")
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    running = Running(client, namespace, cache, StagingSource(base, keyring, _here))
    await ready_checkpoint(client, namespace, "ckpt", "cccc000000000003", nodes=[NODE])

    async def body(r: Running) -> None:
        await r.wait_cached([("cccc000000000003", "1")])
        await client.patch(DYNAMO_CHECKPOINTS, "ckpt", {"metadata": {"annotations": {
            names.ANN_ARTIFACT_VERSION: "2"}}}, namespace)
        await r.wait_cached([])
        await client.patch_status(DYNAMO_CHECKPOINTS, "ckpt", {"status": {
            "staging": {"artifactVersion": "2", "nodes": [NODE]}}}, namespace)
        await r.wait_cached([("cccc000000000003", "2")])

    await run_stager(running, body)
    cache.close()


async def test_a_checkpoint_incompatible_with_this_node_is_not_staged(client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    elsewhere = Compatibility("4.1", HERE.kernel, "riscv64")
    store_version(base, "dddd000000000004", keyring, compatibility=elsewhere)
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    running = Running(client, namespace, cache, StagingSource(base, keyring, _here))
    await ready_checkpoint(client, namespace, "ckpt", "dddd000000000004", nodes=[NODE])

    async def body(r: Running) -> None:
        await until(lambda: r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "refused"}))
        assert r.cached() == []
        await r.wait_reported([])

    await run_stager(running, body)
    cache.close()


async def test_a_checkpoint_larger_than_the_whole_budget_is_refused_once_not_retried_forever(
        client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    store_version(base, "dddd000000000007", keyring)  # 64 KiB of page data and more
    cache = NodeCache(tmp_path / "cache", 16 << 10)
    running = Running(client, namespace, cache, StagingSource(base, keyring, _here))
    await ready_checkpoint(client, namespace, "ckpt", "dddd000000000007", nodes=[NODE])

    async def body(r: Running) -> None:
        await until(lambda: r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "refused"}))
        assert r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "postponed"}) in (None, 0)
        assert r.cached() == []
        await r.wait_reported([])

    await run_stager(running, body)
    cache.close()


async def test_a_version_a_restore_is_caching_is_waited_for_not_counted_as_a_failure(
        client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    stored = store_version(base, "dddd000000000008", keyring)
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    # a restore from storage filling the cache with this version (its follow-up fill) when staging asks
    under_way = cache.begin("dddd000000000008", "1", authn.open_manifest(stored, keyring), 1 << 20)
    running = Running(client, namespace, cache, StagingSource(base, keyring, _here))
    await ready_checkpoint(client, namespace, "ckpt", "dddd000000000008", nodes=[NODE])

    async def body(r: Running) -> None:
        await until(lambda: r.registry.get_sample_value("snapshot_agent_staging_in_progress") == 1)
        under_way.close()  # that fill ends (here without an entry): staging looks again and fills it
        await r.wait_cached([("dddd000000000008", "1")])
        assert r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "failed"}) in (None, 0)
        assert r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "staged"}) == 1

    await run_stager(running, body)
    cache.close()


async def test_a_restarted_agent_drops_entries_of_deleted_checkpoints_and_keeps_the_rest(
        client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    kept, gone = store_version(base, "eeee000000000005", keyring), store_version(base, "ffff000000000006", keyring)
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    for directory, checkpoint_id in ((kept, "eeee000000000005"), (gone, "ffff000000000006")):
        cache.fill(checkpoint_id, "1", directory, authn.open_manifest(directory, keyring))
    cache.close()
    await ready_checkpoint(client, namespace, "kept", "eeee000000000005", nodes=[NODE])
    (kept / "pages-1.img").write_bytes(b"changed on storage")  # a refetch would now fail

    restarted = NodeCache(tmp_path / "cache", 16 << 20)  # the cache of the next agent start
    running = Running(client, namespace, restarted, StagingSource(base, keyring, _here))

    async def body(r: Running) -> None:
        await r.wait_cached([("eeee000000000005", "1")])
        await r.wait_reported([{"checkpointID": "eeee000000000005", "version": "1"}])
        assert r.registry.get_sample_value("snapshot_agent_staging_total", {"result": "failed"}) is None

    await run_stager(running, body)
    restarted.close()


async def test_a_podmount_agent_does_not_stage_but_still_drops(client, namespace, tmp_path, keyring):
    base = tmp_path / "pvc"
    directory = store_version(base, "abab000000000007", keyring)
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    cache.fill("abab000000000007", "1", directory, authn.open_manifest(directory, keyring))
    store_version(base, "cdcd000000000008", keyring)
    running = Running(client, namespace, cache, source=None)
    await ready_checkpoint(client, namespace, "held", "abab000000000007", nodes=[NODE])
    await ready_checkpoint(client, namespace, "named", "cdcd000000000008", nodes=[NODE])

    async def body(r: Running) -> None:
        await r.wait_reported([{"checkpointID": "abab000000000007", "version": "1"}])
        await client.delete(DYNAMO_CHECKPOINTS, "held", namespace)
        await r.wait_reported([])
        assert r.cached() == []

    await run_stager(running, body)
    cache.close()


async def _here() -> Compatibility:
    return HERE


@pytest.mark.parametrize(("mode", "stages"), [("agentMount", True), ("podMount", False)])
async def test_the_agent_with_a_node_cache_watches_checkpoints_and_stages_only_from_storage_it_mounts(
        client, tmp_path, mode, stages):
    from dynamo_snapshot.agent.service import main

    path = tmp_path / "config.yaml"
    path.write_text(f"cache:\n  dir: {tmp_path / 'cache'}\n  budgetGiB: 1\n")
    parser = main.build_parser()
    options = main.options_from(parser.parse_args(
        ["--node-name=n1", "--namespace=infra", f"--config={path}", f"--storage-access-mode={mode}",
         f"--storage-base-path={tmp_path / 'pvc'}"]), parser)
    cache = main.node_cache(options)
    stager = main.stager_for(options, client, InformerFactory(client), cache, bundle=None, cuda=None,
                             identity="snapshot-agent-n1", metrics=None)
    assert (stager.source is not None) is stages
    assert stager.lease_name == "snapshot-staged-n1" and stager.lease_namespace == "infra"
    assert stager.checkpoints.namespace == options.watched_namespace
    cache.close()


async def test_with_object_storage_a_checkpoint_is_staged_from_the_bucket_straight_into_the_node_cache(
        client, namespace, tmp_path, keyring, minio_server, bucket):
    from dynamo_snapshot.agent.artifact import objectstore
    from dynamo_snapshot.agent.artifact.remote import ObjectStorage
    from tests.agent.test_object_storage import client_for

    made = store_version(tmp_path / "source-node", "eeee000000000005", keyring)
    s3 = client_for(minio_server, bucket)
    await objectstore.upload_version(s3, made, objectstore.Location("fleet", "eeee000000000005"), keyring)
    local = tmp_path / "objects"  # the agent's node-local base: checkpoints written before their upload
    cache = NodeCache(tmp_path / "cache", 16 << 20)
    running = Running(client, namespace, cache, StagingSource(local, keyring, _here, ObjectStorage(s3, "fleet")))
    await ready_checkpoint(client, namespace, "in-bucket", "eeee000000000005", nodes=[NODE])

    async def body(r: Running) -> None:
        await r.wait_cached([("eeee000000000005", "1")])
        await r.wait_reported([{"checkpointID": "eeee000000000005", "version": "1"}])
        with cache.use("eeee000000000005", "1", authn.open_manifest(made, keyring)) as hit:
            assert hit is not None and (hit.path / "pages-1.img").read_bytes() == (made / "pages-1.img").read_bytes()
        assert not local.exists()  # one node-local copy: the cache's

    await run_stager(running, body)
    cache.close()
