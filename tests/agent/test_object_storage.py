"""Checkpoints in object storage, against a real S3 server (MinIO on loopback, hack/build-minio.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.artifact import authn, objectstore
from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import s3 as s3client
from dynamo_snapshot.agent.artifact.cachefiles import PARTIAL, RECORD
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.errors import ArtifactInvalid, CheckpointError
from dynamo_snapshot.agent.pipeline.hooks import Hooks
from dynamo_snapshot.devcluster import minio

HERE = artifact.Compatibility(criu_version="4.2.1", kernel="6.18.44", architecture="x86_64")
CHUNK = 1 << 20  # small digest chunks so a few MiB make a multi-chunk, multipart file


@pytest.fixture
def keyring(tmp_path: Path) -> authn.Keyring:
    authn.create_key(tmp_path / "keys", "k1")
    return authn.Keyring.from_directory(tmp_path / "keys")


def make_version(base: Path, keyring: authn.Keyring, checkpoint_id: str = "ck1", namespace: str = "") -> Path:
    """A promoted, authenticated version: a multi-chunk page image, small files, one in a subdirectory
    (taken in ``namespace``, when given)."""
    layout = artifact_layout.ArtifactLayout(base, checkpoint_id)
    staging = layout.new_staging()
    (staging / "pages-1.img").write_bytes(os.urandom(6 * CHUNK + 12345))
    (staging / "dump.log").write_text("(00.1) Dumping finished successfully\n")
    (staging / "deleted-files.json").write_text("[]\n")
    (staging / "empty.img").write_bytes(b"")
    (staging / "sub").mkdir()
    (staging / "sub" / "core-1.img").write_bytes(os.urandom(3000))
    fields = {"checkpointID": checkpoint_id, "compatibility": HERE.to_json(), authn.KEY_FIELD: keyring.signing_id,
              **({"workload": {"namespace": namespace}} if namespace else {})}
    artifact.write_manifest(staging, fields, chunk_bytes=CHUNK)
    authn.seal(staging, keyring)
    return layout.promote(staging)


def client_for(server: minio.Minio, bucket: str) -> s3client.S3Client:
    return s3client.S3Client(s3client.S3Settings(
        bucket=bucket, endpoint=server.endpoint, region=minio.REGION, path_style=True,
        access_key_id=server.user, secret_access_key=server.password, part_bytes=5 << 20,
        max_retries=2, retry_timeout_s=3))


LOCATION = objectstore.Location(prefix="fleet/ckpts", checkpoint_id="ck1")


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a version (a node cache entry's completion record aside)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*")
            if p.is_file() and p.name != RECORD}


def upload(client: s3client.S3Client, version: Path, keyring: authn.Keyring,
           location: objectstore.Location = LOCATION) -> None:
    anyio.run(lambda: objectstore.upload_version(client, version, location, keyring, concurrency=4))


def storage(client) -> ObjectStorage:
    return ObjectStorage(client, prefix=LOCATION.prefix, concurrency=4)


def download(client, cache: Path | NodeCache, keyring: authn.Keyring, checkpoint_id: str = "ck1") -> Path:
    """A restore's fetch stage: the version into the node cache (a new one at ``cache`` when a path),
    pinned, then let go; returns the entry's directory."""
    node = cache if isinstance(cache, NodeCache) else NodeCache(cache, 1 << 30)
    pinned, _ = anyio.run(lambda: storage(client).fetch(node, checkpoint_id, "1", keyring, HERE))
    pinned.close()
    return pinned.path


def nothing_cached(cache: Path) -> bool:
    """No entry and no partial fill left in the node cache directory ``cache``."""
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == [PARTIAL]


def test_an_uploaded_version_downloads_byte_identical_and_verified(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    cache = NodeCache(tmp_path / "cache", 1 << 30)
    cached = download(client, cache, keyring)
    assert cached == tmp_path / "cache" / "ck1" / "1"  # a node cache entry: the only node-local copy
    assert _files(cached) == _files(version)
    assert (cached / RECORD).is_file() and not any((tmp_path / "cache" / PARTIAL).iterdir())
    assert [(e.checkpoint_id, e.version, e.pins) for e in cache.entries()] == [("ck1", "1", 0)]
    reads: list[str] = []
    assert download(_Counting(client, reads), cache, keyring) == cached  # a second restore reads the cache
    assert reads == []


def test_the_big_file_is_uploaded_in_multipart_parts(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    upload(client_for(minio_server, bucket), version, keyring)
    status, headers = minio_server.head(f"/{bucket}/{LOCATION.key('pages-1.img')}")
    etag = headers["etag"]
    assert status == 200 and etag.strip('"').endswith("-2"), etag  # 6 MiB in 5 MiB parts: a two-part ETag


def test_a_bucket_with_the_data_but_no_manifest_is_not_a_checkpoint(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    status, _ = minio_server.request("DELETE", f"/{bucket}/{LOCATION.key('manifest.json')}")
    assert status == 204
    with pytest.raises(ArtifactInvalid, match=r"has no manifest.json: it is not a checkpoint"):
        download(client, tmp_path / "cache", keyring)
    assert nothing_cached(tmp_path / "cache")


def test_a_tampered_object_is_refused_naming_the_file(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    data = bytearray((version / "pages-1.img").read_bytes())
    data[3 * CHUNK + 7] ^= 0xFF
    status, _ = minio_server.request("PUT", f"/{bucket}/{LOCATION.key('pages-1.img')}", body=bytes(data))
    assert status == 200
    with pytest.raises(ArtifactInvalid, match=rf"pages-1.img has SHA-256 \w+ in bytes {3 * CHUNK}-{4 * CHUNK}"):
        download(client, tmp_path / "cache", keyring)
    assert nothing_cached(tmp_path / "cache")


def test_a_manifest_not_signed_by_a_known_key_is_refused_before_any_data_is_read(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    authn.create_key(tmp_path / "other", "k1")
    stranger = authn.Keyring.from_directory(tmp_path / "other")
    reads: list[str] = []
    counting = _Counting(client, reads)
    with pytest.raises(ArtifactInvalid, match=r"does not match its manifest.json.mac"):
        download(counting, tmp_path / "cache", stranger)
    assert reads == []


def test_an_interrupted_download_leaves_no_complete_looking_cache_entry_and_a_retry_recovers(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    cache = tmp_path / "cache"
    unreachable = rf"of s3://{bucket}/fleet/ckpts/ck1/versions/1/\S+ failed: the endpoint could not be reached"
    try:
        with pytest.raises(objectstore.ObjectStoreError, match=unreachable):  # whichever file was being read
            download(_StopsServerAfterOneRange(client, minio_server), cache, keyring)  # the S3 server goes away
        assert nothing_cached(cache)
    finally:
        if minio_server.process is None:  # stopped by the download above
            minio_server.start()  # the same data directory and port: the server comes back
    assert _files(download(client_for(minio_server, bucket), cache, keyring)) == _files(version)


def test_a_committed_version_is_never_replaced_by_another_upload(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    with pytest.raises(CheckpointError, match=r"manifest.json already exists: version 1 of ck1 is committed"):
        upload(client, version, keyring)


def test_a_wrong_credential_is_a_clear_error_naming_the_bucket(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    wrong = s3client.S3Client(s3client.S3Settings(
        bucket=bucket, endpoint=minio_server.endpoint, region=minio.REGION, path_style=True,
        access_key_id=minio_server.user, secret_access_key="not-the-password"))
    with pytest.raises(objectstore.ObjectStoreError,
                       match=rf"s3://{bucket}/fleet/ckpts/ck1/versions/1/.* the credentials were refused"):
        upload(wrong, version, keyring)


def test_a_missing_bucket_is_a_clear_error_naming_it_for_upload_and_restore(
        minio_server: minio.Minio, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, "no-such-bucket-here")
    with pytest.raises(objectstore.ObjectStoreError, match=r"s3://no-such-bucket-here/.* the bucket does not exist"):
        upload(client, version, keyring)
    with pytest.raises(objectstore.ObjectStoreError, match=r"s3://no-such-bucket-here/.* the bucket does not exist"):
        download(client, tmp_path / "cache", keyring)
    assert nothing_cached(tmp_path / "cache")


def test_an_object_shorter_than_its_manifest_says_is_refused_naming_it(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    short = (version / "pages-1.img").read_bytes()[: 2 * CHUNK + 5]
    status, _ = minio_server.request("PUT", f"/{bucket}/{LOCATION.key('pages-1.img')}", body=short)
    assert status == 200
    with pytest.raises(ArtifactInvalid, match=r"pages-1.img returned \d+ bytes for bytes .*shorter than the manifest"):
        download(client, tmp_path / "cache", keyring)
    assert nothing_cached(tmp_path / "cache")


def test_an_upload_interrupted_before_the_manifest_is_not_restorable_and_a_retry_completes_it(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    with pytest.raises(objectstore.ObjectStoreError, match="writing s3://"):
        upload(_FailsOnManifest(client), version, keyring)  # every data object landed, the commit did not
    status, _ = minio_server.head(f"/{bucket}/{LOCATION.key('pages-1.img')}")
    assert status == 200
    with pytest.raises(ArtifactInvalid, match=r"has no manifest.json: it is not a checkpoint"):
        download(client, tmp_path / "cache", keyring)
    upload(client, version, keyring)  # the retry writes over the uncommitted objects and commits
    assert _files(download(client, tmp_path / "cache", keyring)) == _files(version)


class _Counting:
    """The real client, recording the data reads (ranged GETs) it is asked for."""

    def __init__(self, inner: s3client.S3Client, reads: list[str]):
        self.inner, self.reads = inner, reads

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        self.reads.append(key)
        return await self.inner.get_range(key, start, length)


class _FailsOnManifest(_Counting):
    """The real client, whose write of manifest.json fails (as if the agent died just before the commit)."""

    def __init__(self, inner: s3client.S3Client):
        super().__init__(inner, [])

    async def put_bytes(self, key: str, data: bytes, create_only: bool = False) -> None:
        if key.endswith("/manifest.json"):
            raise objectstore.ObjectStoreError(f"writing {self.url(key)} failed: the agent stopped")
        await self.inner.put_bytes(key, data, create_only)


class _StopsServerAfterOneRange(_Counting):
    """The real client; after the first ranged GET lands, the real S3 server is stopped."""

    def __init__(self, inner: s3client.S3Client, server: minio.Minio):
        super().__init__(inner, [])
        self.server, self.stopped = server, False

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        data = await super().get_range(key, start, length)
        if not self.stopped:
            self.stopped = True
            self.server.stop()  # on the event loop on purpose: no further piece starts before the server is gone
        return data


def criu_bundle() -> criu.CriuBundle:
    """The CRIU bundle, or a skip with the reason (the tree tests need root and CRIU)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU)")
    try:
        return criu.CriuBundle.locate()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_a_process_tree_checkpointed_into_the_bucket_restores_on_a_node_that_never_had_it(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    from tests.agent.test_tree_restore import counting, gone, start_ticker

    bundle = criu_bundle()
    remote = ObjectStorage(client_for(minio_server, bucket), prefix="fleet/ckpts", concurrency=4)
    settings = criu.CriuSettings(network_lock="skip")
    proc, count = start_ticker(tmp_path)
    stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "node-a", "t3", bundle, settings=settings,
                                                    keyring=keyring, remote=remote))
    gone(proc.pid)
    status, _ = minio_server.head(f"/{bucket}/fleet/ckpts/t3/versions/1/manifest.json")
    assert status == 200
    cache = NodeCache(tmp_path / "node-b-cache", 1 << 30)
    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "node-b", "t3", bundle, settings=settings,
                                                   io_threads=4, keyring=keyring, remote=remote, cache=cache))
    try:
        assert restored.pid == proc.pid
        assert "fetch" in restored.seconds
        assert _files(tmp_path / "node-b-cache" / "t3" / "1") == _files(stored.directory)  # fetched into the cache
        assert not (tmp_path / "node-b" / "t3" / "versions").exists()  # and nowhere else
        assert [(e.checkpoint_id, e.pins) for e in cache.entries()] == [("t3", 0)]  # let go after the restore
        assert counting(count)
    finally:
        gone(restored.pid)


def test_an_unconfirmed_commit_is_taken_back_whole_or_uncommitted_and_a_new_upload_lands(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    version = make_version(tmp_path / "pvc", keyring)
    client = client_for(minio_server, bucket)
    upload(client, version, keyring)
    manifest = authn.open_manifest(version, keyring)
    anyio.run(lambda: objectstore.withdraw_version(client, LOCATION, manifest))  # its confirmation failed
    for rel in ("manifest.json", "manifest.json.mac", "pages-1.img", "sub/core-1.img"):
        assert minio_server.head(f"/{bucket}/{LOCATION.key(rel)}")[0] == 404, rel
    upload(client, version, keyring)  # a retry of the same version
    # its agent died before the verdict: the next attempt only uncommits, then writes over the data
    assert anyio.run(lambda: objectstore.uncommit(client, LOCATION)) is True
    with pytest.raises(ArtifactInvalid, match=r"has no manifest.json: it is not a checkpoint"):
        download(client, tmp_path / "cache", keyring)
    assert anyio.run(lambda: objectstore.uncommit(client, LOCATION)) is False
    upload(client, version, keyring)
    assert _files(download(client, tmp_path / "cache", keyring)) == _files(version)


def test_a_checkpoint_whose_confirmation_fails_leaves_nothing_committed_and_its_retry_lands(
        minio_server: minio.Minio, bucket: str, keyring: authn.Keyring, tmp_path: Path) -> None:
    from tests.agent.test_tree_restore import gone, start_ticker

    bundle = criu_bundle()

    class Refused(Hooks):
        async def confirm(self, directory: Path) -> None:
            raise CheckpointError("the Job could not be annotated (the API server said no)")

    remote = ObjectStorage(client_for(minio_server, bucket), prefix="fleet/ckpts", concurrency=4)
    settings = criu.CriuSettings(network_lock="skip")
    committed = f"/{bucket}/fleet/ckpts/t4/versions/1/manifest.json"
    proc, _ = start_ticker(tmp_path)
    try:
        with pytest.raises(CheckpointError, match="could not be annotated"):
            anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "node-a", "t4", bundle, settings=settings,
                                                   keyring=keyring, remote=remote, hooks=Refused()))
        assert minio_server.head(committed)[0] == 404  # withdrawn with the local version
        stored = anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "node-a", "t4", bundle,
                                                        settings=settings, keyring=keyring, remote=remote))
        assert minio_server.head(committed)[0] == 200
        assert stored.directory.exists()
    finally:
        gone(proc.pid)
