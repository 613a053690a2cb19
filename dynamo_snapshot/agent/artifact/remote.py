"""Where a checkpoint is kept beyond the node: the pipelines' one storage parameter (``Request.remote``).

    None           PVC storage: the version lives where the pipeline wrote it (``<base>``) and is read there
    ObjectStorage  S3: the checkpoint pipeline writes and promotes the version in a node-local ``<base>`` as
                   for a PVC, then its ``upload`` stage puts it in the bucket (manifest last:
                   ``objectstore.upload_version``); the restore pipeline's ``fetch`` stage (and pre-staging)
                   brings it into the node cache (``fetch``, below), and everything after reads that pinned
                   entry as it reads a cache hit

Fetch stages (``ObjectStorage.fetch``):
    manifest  fetched and authenticated (``objectstore.fetch_manifest``), then checked for this node (ID,
              format, compatibility: ``verification.check_manifest``) before any data is read
    hit       the node cache's entry of this version bound to that manifest, pinned: nothing is fetched
    reserve   room in the cache's budget (least recently used unpinned entries evicted; ``NodeCacheFull``
              when even that is not enough, before a byte is written) and a temporary directory; a fill of
              the same version under way (another restore, pre-staging) is waited for, then pinned
    fetch     ``objectstore.download_files`` into it, each chunk verified as it lands
    complete  the manifest's and MAC's exact bytes, the listing checked (sizes, nothing unlisted), the
              completion record, one rename into place, pinned for the caller. Any failure - a tampered or
              missing object, the server gone, a full disk (``NodeCacheError`` saying so) - removes the
              temporary directory and gives the room back: a retry starts clean

The checkpoint and restore pipelines are the same for both; only these stages differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from dynamo_snapshot.agent.artifact import authn, cachefiles, objectstore, verification
from dynamo_snapshot.agent.artifact.manifest import Compatibility
from dynamo_snapshot.agent.artifact.nodecache import Filling, FillUnderWay, NodeCache, NodeCacheError, Pinned

FETCH_ROUNDS = 3  # a pin that misses after a fill (evicted or dropped at once) is tried again this often


@dataclass(frozen=True)
class ObjectStorage:
    client: objectstore.ObjectClient
    prefix: str = ""
    concurrency: int = objectstore.DEFAULT_CONCURRENCY

    def location(self, checkpoint_id: str, artifact_version: str) -> objectstore.Location:
        return objectstore.Location(self.prefix, checkpoint_id, artifact_version)

    def describe_root(self) -> str:
        """``s3://bucket/prefix`` (logs)."""
        return self.client.url(self.prefix.strip("/")).rstrip("/")

    def checkpoint_url(self, checkpoint_id: str) -> str:
        """``s3://bucket/prefix/<checkpointID>`` (status ``location``)."""
        return self.client.url("/".join(p for p in (self.prefix.strip("/"), checkpoint_id) if p))

    def describe(self, checkpoint_id: str, artifact_version: str) -> str:
        """The version's address, for status ``location`` and logs: ``s3://bucket/prefix/<id>/versions/<v>/``."""
        return self.client.url(self.location(checkpoint_id, artifact_version).key()) + "/"

    async def upload(self, directory: Path, checkpoint_id: str, artifact_version: str,
                     keyring: authn.Keyring) -> dict[str, Any]:
        location = self.location(checkpoint_id, artifact_version)
        return await objectstore.upload_version(self.client, directory, location, keyring, self.concurrency)

    async def uncommit(self, checkpoint_id: str, artifact_version: str) -> bool:
        """An unconfirmed commit an earlier attempt left taken back: ``objectstore.uncommit``."""
        return await objectstore.uncommit(self.client, self.location(checkpoint_id, artifact_version))

    async def withdraw(self, checkpoint_id: str, artifact_version: str, manifest: dict[str, Any]) -> None:
        """The version's commit taken back (it was never confirmed): ``objectstore.withdraw_version``."""
        await objectstore.withdraw_version(self.client, self.location(checkpoint_id, artifact_version), manifest)

    async def delete(self, checkpoint_id: str) -> int:
        """Every object of the checkpoint (every version), nothing else: ``objectstore.delete_checkpoint``."""
        return await objectstore.delete_checkpoint(self.client, self.prefix, checkpoint_id)

    async def fetch(self, cache: NodeCache, checkpoint_id: str, artifact_version: str, keyring: authn.Keyring,
                    here: Compatibility, namespace: str = "") -> tuple[Pinned, dict[str, Any]]:
        """The version as a pinned node cache entry (fetched into the cache unless it is there), and its
        authenticated manifest; refused before a byte of data is fetched when the manifest is for another
        ``namespace`` than the restoring pod's. The caller closes the pin when it has read the entry."""
        location = self.location(checkpoint_id, artifact_version)
        manifest, data, mac = await objectstore.fetch_manifest(self.client, location, keyring)
        where = self.describe(checkpoint_id, artifact_version).rstrip("/")
        verification.check_manifest(manifest, checkpoint_id, here, where)
        verification.check_namespace(manifest, namespace, where)
        need = cachefiles.listed_bytes(manifest) + len(data) + len(mac)
        for _ in range(FETCH_ROUNDS):
            pinned = await _pinning(cache.pin, checkpoint_id, artifact_version, manifest)
            if pinned is not None:
                return pinned, manifest
            try:
                filling = await anyio.to_thread.run_sync(cache.begin, checkpoint_id, artifact_version, manifest, need)
            except FillUnderWay as busy:  # another restore or a pre-staging fetches it: wait, then pin
                await anyio.to_thread.run_sync(busy.done.wait, abandon_on_cancel=True)
                continue
            if filling is not None:
                return await self._fill(filling, location, manifest, data, mac, here), manifest
        raise NodeCacheError(f"{where}: the node cache lost the version as soon as it was cached "
                             f"({FETCH_ROUNDS} times; dropped or evicted at once); retried with the next attempt")

    async def _fill(self, filling: Filling, location: objectstore.Location, manifest: dict[str, Any], data: bytes,
                    mac: bytes, here: Compatibility) -> Pinned:
        tmp, checkpoint_id = filling.tmp, location.checkpoint_id

        def complete() -> Pinned | None:
            cachefiles.write_sidecar(tmp, authn.MANIFEST, data)
            cachefiles.write_sidecar(tmp, authn.MAC_FILE, mac)
            verification.verify_listing(tmp, checkpoint_id, here, manifest=manifest)
            cachefiles.complete(tmp, filling.record)
            return filling.commit_pinned()

        try:
            await objectstore.download_files(self.client, location, manifest, tmp, self.concurrency)
            pinned = await _pinning(complete)
        except (OSError, cachefiles.Stopping) as exc:
            raise filling.failed(exc) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(filling.close)
        if pinned is None:
            raise NodeCacheError(f"{self.describe(checkpoint_id, location.artifact_version)}: checkpoint "
                                 f"{checkpoint_id} was dropped from the node cache (deleted) while it was fetched; "
                                 "nothing was kept")
        return pinned


async def _pinning(pin: Callable[..., Pinned | None], *args: Any) -> Pinned | None:
    """``pin(*args)`` on a worker thread. Cancelled meanwhile, the task waits for the thread and loses its
    result: a pin it made is let go then, or the entry could never be evicted."""
    made: list[Pinned | None] = []

    def run() -> Pinned | None:
        made.append(pin(*args))
        return made[0]

    try:
        return await anyio.to_thread.run_sync(run)
    except BaseException:
        if made and made[0] is not None:
            made[0].close()
        raise
