"""Where a checkpoint is kept beyond the node: the pipelines' one storage parameter (``Request.remote``).

    None           PVC storage: the version lives where the pipeline wrote it (``<base>``) and is read there
    ObjectStorage  S3: the checkpoint pipeline writes and promotes the version in a node-local ``<base>`` as
                   for a PVC, then its ``upload`` stage puts it in the bucket (manifest last:
                   ``objectstore.upload_version``); the restore pipeline's ``fetch`` stage downloads it,
                   verified, into the node-local ``<base>`` (``objectstore.download_version``), and everything
                   after reads that copy exactly as it reads a PVC's

The checkpoint and restore pipelines are the same for both; only these two stages differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact import authn, objectstore
from dynamo_snapshot.agent.artifact.manifest import Compatibility


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

    async def fetch(self, base: Path, checkpoint_id: str, artifact_version: str, keyring: authn.Keyring,
                    here: Compatibility) -> Path:
        location = self.location(checkpoint_id, artifact_version)
        return await objectstore.download_version(self.client, location, base, keyring, here, self.concurrency)
