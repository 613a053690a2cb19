"""A restore from object storage fetches into the node cache, against a real S3 server (MinIO on loopback):
the budget holds, the least recently used version goes first and never one a restore reads, a full cache
disk is a clear error that a retry recovers from, and two restores of one version fetch it once."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.artifact import authn, objectstore
from dynamo_snapshot.agent.artifact.nodecache import NodeCache, NodeCacheError, NodeCacheFull, Pinned
from dynamo_snapshot.agent.errors import ArtifactInvalid
from dynamo_snapshot.devcluster import minio
from tests.agent.test_object_storage import (
    HERE,
    LOCATION,
    _Counting,
    _files,
    client_for,
    download,
    make_version,
    nothing_cached,
    storage,
    upload,
)


@pytest.fixture
def keyring(tmp_path: Path) -> authn.Keyring:
    authn.create_key(tmp_path / "keys", "k1")
    return authn.Keyring.from_directory(tmp_path / "keys")


def uploaded(client, tmp_path: Path, keyring: authn.Keyring, *ids: str) -> dict[str, Path]:
    """Versions of the checkpoints ``ids`` made on a source node and uploaded; each one's local directory."""
    versions = {}
    for checkpoint_id in ids:
        versions[checkpoint_id] = make_version(tmp_path / "source", keyring, checkpoint_id)
        upload(client, versions[checkpoint_id], keyring, objectstore.Location(LOCATION.prefix, checkpoint_id))
    return versions


def entry_bytes(version: Path) -> int:
    """What a version takes in the node cache's budget: every file, the manifest and its MAC included."""
    return sum(p.stat().st_size for p in version.rglob("*") if p.is_file())


def pin(client, cache: NodeCache, keyring: authn.Keyring, checkpoint_id: str) -> Pinned:
    """A restore's fetch stage: the version pinned in the cache (the restore reads it until ``close``)."""
    pinned, _ = anyio.run(lambda: storage(client).fetch(cache, checkpoint_id, "1", keyring, HERE))
    return pinned


def cached(cache: NodeCache) -> list[tuple[str, int]]:
    return [(e.checkpoint_id, e.pins) for e in cache.entries()]


def test_restoring_more_checkpoints_than_the_budget_holds_evicts_the_least_recently_used_never_one_being_read(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    client = client_for(minio_server, bucket)
    versions = uploaded(client, tmp_path, keyring, "ck-a", "ck-b", "ck-c")
    size = entry_bytes(versions["ck-a"])
    cache = NodeCache(tmp_path / "cache", size * 5 // 2)  # two versions fit, three do not

    reading = pin(client, cache, keyring, "ck-a")  # a restore reads ck-a (the least recently used from here on)
    download(client, cache, keyring, "ck-b")  # a restore of ck-b, done
    download(client, cache, keyring, "ck-c")  # no room: ck-b goes, not the pinned ck-a
    assert cached(cache) == [("ck-a", 1), ("ck-c", 0)]
    assert _files(reading.path) == _files(versions["ck-a"])  # what the running restore reads is whole
    assert cache.used_bytes <= cache.budget_bytes

    also = pin(client, cache, keyring, "ck-c")
    with pytest.raises(NodeCacheFull, match=r"do not fit the budget .* pinned by running restores: ck-a/1, ck-c/1"):
        download(client, cache, keyring, "ck-b")  # both entries are being read: refused, nothing written
    assert cached(cache) == [("ck-a", 1), ("ck-c", 1)]
    assert not any((tmp_path / "cache" / ".partial").iterdir())
    also.close()
    reading.close()

    download(client, cache, keyring, "ck-b")  # the retry, once the restores are done: ck-a is now the oldest
    assert cached(cache) == [("ck-c", 0), ("ck-b", 0)]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".partial", "ck-b", "ck-c"]
    assert cache.used_bytes == 2 * size


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem (tmpfs) for the node cache: one version fits, not beside a 12 MiB file."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts a small tmpfs as the cache disk)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_disk_is_a_clear_error_before_anything_is_fetched_and_a_retry_recovers(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path, small_disk: Path) -> None:
    client = client_for(minio_server, bucket)
    versions = uploaded(client, tmp_path, keyring, "ck1")
    (small_disk / "other-files").write_bytes(b"x" * (12 << 20))  # the disk is used by something else
    cache = NodeCache(small_disk / "cache", 1 << 30)  # the budget allows the version; the disk does not
    reads: list[str] = []
    with pytest.raises(NodeCacheError, match=r"filling ck1 version 1 failed \(the cache disk is full\).*nothing was "
                                             r"cached"):
        download(_Counting(client, reads), cache, keyring)
    assert reads == []  # the files are allocated before a byte is fetched
    assert cache.entries() == [] and cache.used_bytes == 0 and nothing_cached(small_disk / "cache")
    (small_disk / "other-files").unlink()
    assert _files(download(client, cache, keyring)) == _files(versions["ck1"])  # the retry, with room again


def test_a_pod_of_another_namespace_is_refused_before_a_byte_of_the_checkpoint_is_fetched(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    """One bucket holds every namespace's checkpoints: the authenticated manifest says whose it is."""
    client = client_for(minio_server, bucket)
    version = make_version(tmp_path / "source", keyring, "ck1", namespace="team-a")
    upload(client, version, keyring, objectstore.Location(LOCATION.prefix, "ck1"))
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    reads: list[str] = []
    fetch = storage(_Counting(client, reads)).fetch
    with pytest.raises(ArtifactInvalid, match="was checkpointed in namespace 'team-a': a pod of namespace 'team-b' "
                                              "cannot restore it"):
        anyio.run(lambda: fetch(cache, "ck1", "1", keyring, HERE, "team-b"))
    assert reads == [] and cache.entries() == []
    pinned, _ = anyio.run(lambda: fetch(cache, "ck1", "1", keyring, HERE, "team-a"))  # its own namespace's pod
    pinned.close()


def test_two_restores_of_one_version_at_once_fetch_it_once_and_read_the_same_entry(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    client = client_for(minio_server, bucket)
    versions = uploaded(client, tmp_path, keyring, "ck1")
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    reads: list[str] = []
    counting = storage(_Counting(client, reads))
    pins: list[Pinned] = []

    async def restore() -> None:
        pinned, _ = await counting.fetch(cache, "ck1", "1", keyring, HERE)
        pins.append(pinned)

    async def both() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(restore)
            group.start_soon(restore)

    anyio.run(both)
    pieces = objectstore.plan_pieces(authn.open_manifest(versions["ck1"], keyring), "the manifest")
    assert len(reads) == sum(1 for piece in pieces if piece.length)  # one download's ranged reads, not two
    assert [p.path for p in pins] == [tmp_path / "cache" / "ck1" / "1"] * 2 and cached(cache) == [("ck1", 2)]
    for pinned in pins:
        pinned.close()
    assert cached(cache) == [("ck1", 0)]


def test_a_checkpoint_dropped_while_it_is_fetched_is_not_kept_and_the_restore_fails_saying_so(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    client = client_for(minio_server, bucket)
    uploaded(client, tmp_path, keyring, "ck1")
    cache = NodeCache(tmp_path / "cache", 1 << 30)

    class DropsOnFirstRead(_Counting):
        async def get_range(self, key: str, start: int, length: int) -> bytes:
            if not self.reads:
                cache.drop("ck1")  # its DynamoCheckpoint was deleted (service/staging.py drops it)
            return await super().get_range(key, start, length)

    with pytest.raises(NodeCacheError, match=r"ck1 was dropped from the node cache \(deleted\) while it was fetched"):
        download(DropsOnFirstRead(client, []), cache, keyring)
    assert cache.entries() == [] and nothing_cached(tmp_path / "cache")


def test_a_restore_fetching_when_the_checkpoint_is_deleted_from_the_bucket_fails_cleanly_and_keeps_nothing(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    client = client_for(minio_server, bucket)
    uploaded(client, tmp_path, keyring, "ck1")
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    objects = len(minio_server.list_objects(bucket, "fleet/ckpts/ck1/"))

    deleted = anyio.Event()

    class DeletedAfterFirstRead(_Counting):
        async def get_range(self, key: str, start: int, length: int) -> bytes:
            if self.reads:  # every read after the first one lands once the objects are gone
                await deleted.wait()
                return await super().get_range(key, start, length)
            data = await super().get_range(key, start, length)
            # the DynamoCheckpoint was deleted meanwhile: an agent removes its objects
            assert await objectstore.delete_checkpoint(client, LOCATION.prefix, "ck1") == objects
            deleted.set()
            return data

    with pytest.raises(objectstore.ObjectStoreError, match=rf"s3://{bucket}/fleet/ckpts/ck1/versions/1/\S+ failed: "
                                                            r"the object is not there \(deleted meanwhile"):
        download(DeletedAfterFirstRead(client, []), cache, keyring)
    assert cache.entries() == [] and nothing_cached(tmp_path / "cache")


def test_a_restore_past_its_fetch_is_unharmed_when_the_checkpoint_is_deleted_and_the_entry_goes_after_it(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    from dynamo_snapshot.agent import tree
    from dynamo_snapshot.agent.container import criu
    from dynamo_snapshot.agent.pipeline.hooks import Hooks
    from dynamo_snapshot.agent.pipeline.restore import Stage
    from tests.agent.test_object_storage import criu_bundle
    from tests.agent.test_tree_restore import counting, gone, start_ticker

    bundle = criu_bundle()
    client = client_for(minio_server, bucket)
    remote = storage(client)
    settings = criu.CriuSettings(network_lock="skip")
    proc, count = start_ticker(tmp_path)
    anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "node-a", "ck-live", bundle, settings=settings,
                                           keyring=keyring, remote=remote))
    gone(proc.pid)
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    removed: list[int] = []

    class DeletedWhileRestoring(Hooks):
        async def on_stage(self, stage) -> None:
            if stage == Stage.CRIU:  # fetched and verified; CRIU about to read the pinned entry
                removed.append(await remote.delete("ck-live"))
                cache.drop("ck-live")  # what the agent does when the DynamoCheckpoint goes

    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "node-b", "ck-live", bundle, settings=settings,
                                                   keyring=keyring, remote=remote, cache=cache,
                                                   hooks=DeletedWhileRestoring()))
    try:
        assert removed and removed[0] > 0 and minio_server.list_objects(bucket, "fleet/ckpts/ck-live/") == []
        assert restored.pid == proc.pid and counting(count)  # the restore finished from its pinned copy
        assert cache.entries() == [] and not (tmp_path / "cache" / "ck-live").exists()  # gone once it ended
    finally:
        gone(restored.pid)
