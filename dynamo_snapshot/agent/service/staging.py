"""Pre-staging on the agent: fetch the checkpoints the operator names for this node into the node cache ahead
of the pods that restore from them, drop deleted ones, and say what the cache holds.

    watch     the DynamoCheckpoints of the namespaces the agent serves (an informer: list and watch only;
              the agent never writes one)
    sweep     once synced: entries of checkpoint IDs that no DynamoCheckpoint has any more are dropped
    drop      a deleted DynamoCheckpoint, or one whose artifact version changed: ``NodeCache.drop`` of its
              checkpoint ID (a pinned entry goes when its restore ends)
    stage     a Ready checkpoint whose ``status.staging.nodes`` names this node, version
              ``status.staging.artifactVersion``: authenticated and checked compatible with this node,
              then brought into the cache - copied from the PVC the agent mounts (``NodeCache.fill``), or
              fetched from the bucket straight into it (``ObjectStorage.fetch``); either way room is made
              by evicting least recently used unpinned entries, refused if it cannot fit. ``STAGE_AT_ONCE`` at a time;
              a version cached already is not fetched again (idempotent; a restart finds the entry)
    report    the node's Lease ``snapshot-staged-<node>`` in the agent's namespace, annotated with the
              cache's entries (``nvidia.com/snapshot-staged``): written when they changed, and looked
              at again every ``REPORT_PERIOD_S`` (fills after restores happen beside this module)

podMount agents have no storage of their own to read before a pod mounts it: they drop and report, but do
not stage (docs/agent.md#pre-staging).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.artifact import authn
from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact.manifest import Compatibility
from dynamo_snapshot.agent.artifact.nodecache import FillUnderWay, LargerThanBudget, NodeCache, NodeCacheFull
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.errors import AgentError, ArtifactIncompatible, ArtifactInvalid
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    LEASES,
    AlreadyExists,
    Client,
    Conflict,
    Controller,
    InformerFactory,
    KubeError,
    NotFound,
    ObjectKey,
    Result,
)

log = structlog.get_logger(__name__)

STAGE_AT_ONCE = 2
REPORT_PERIOD_S = 30.0
RETRY_FULL_S = 60.0  # the cache was full of pinned entries: try again later
_REPORT = ObjectKey("", "")  # the queue key of the report (no DynamoCheckpoint has an empty name)


def checkpoint_id_of(ckpt: dict[str, Any]) -> str:
    """The checkpoint ID the operator resolved (status), else the ID label of an automatic checkpoint."""
    status, meta = ckpt.get("status") or {}, ckpt.get("metadata") or {}
    return status.get("checkpointID") or (meta.get("labels") or {}).get(names.LABEL_CHECKPOINT_ID, "")


def artifact_version_of(ckpt: dict[str, Any]) -> str:
    annotations = (ckpt.get("metadata") or {}).get("annotations") or {}
    return annotations.get(names.ANN_ARTIFACT_VERSION) or names.DEFAULT_ARTIFACT_VERSION


def staging_for(ckpt: dict[str, Any], node: str) -> str | None:
    """The version to stage on ``node``, or None when the operator does not ask this node for it."""
    status = ckpt.get("status") or {}
    staging = status.get("staging") or {}
    if status.get("phase") != "Ready" or node not in (staging.get("nodes") or []) or not checkpoint_id_of(ckpt):
        return None
    if (ckpt.get("metadata") or {}).get("deletionTimestamp"):
        return None
    version = staging.get("artifactVersion") or None
    # a staging the operator wrote for an earlier artifact version is stale: the stored one is another
    return version if version == artifact_version_of(ckpt) else None


class StagingSource:
    """Where a version is read from: the PVC under ``base_path``, or object storage."""

    def __init__(self, base_path: Path, keyring: authn.Keyring, here: Callable[[], Awaitable[Compatibility]],
                 remote: ObjectStorage | None = None):
        self.base_path, self.keyring, self.here, self.remote = base_path, keyring, here, remote

    async def stage(self, cache: NodeCache, checkpoint_id: str, version: str) -> None:
        """The version into ``cache``, authenticated and checked compatible with this node first: from the
        bucket straight into the cache (``ObjectStorage.fetch``), or copied from the PVC (``NodeCache.fill``)."""
        here = await self.here()
        if self.remote is not None:
            pinned, _ = await self.remote.fetch(cache, checkpoint_id, version, self.keyring, here)
            pinned.close()
            return
        stored = artifact_layout.ArtifactLayout(self.base_path, checkpoint_id, version).final_dir
        manifest = await anyio.to_thread.run_sync(authn.verify_listing, stored, checkpoint_id, here, self.keyring)
        await anyio.to_thread.run_sync(cache.fill, checkpoint_id, version, stored, manifest)


class Stager:
    def __init__(self, client: Client, factory: InformerFactory, cache: NodeCache, *, node_name: str,
                 watched_namespace: str | None, lease_namespace: str | None, source: StagingSource | None,
                 identity: str = "", metrics: Any = None):
        self.client, self.cache, self.node_name, self.source = client, cache, node_name, source
        self.lease_namespace, self.identity, self.metrics = lease_namespace, identity, metrics
        self.checkpoints = factory.informer(DYNAMO_CHECKPOINTS, namespace=watched_namespace)
        self.checkpoints.add_handler(on_update=self._updated, on_delete=self._deleted)
        self.controller = Controller("snapshot-agent-staging", self.reconcile, workers=STAGE_AT_ONCE)
        self.controller.watch(self.checkpoints)
        self._refused: dict[tuple[str, str], str] = {}  # what cannot be staged here (incompatible, invalid)
        self._reported: list[dict[str, str]] | None = None
        self._swept = False
        self.controller.enqueue(_REPORT)  # the first reconcile (after the sync) sweeps, then reports

    @property
    def lease_name(self) -> str:
        return names.STAGED_LEASE_PREFIX + self.node_name

    # -- drop ----------------------------------------------------------------------------------------
    def _drop(self, checkpoint_id: str, why: str) -> None:
        if checkpoint_id and (dropped := self.cache.drop(checkpoint_id)):
            log.info("node cache: checkpoint dropped", checkpoint_id=checkpoint_id, versions=dropped, reason=why)
        self.controller.enqueue(_REPORT)

    def _deleted(self, ckpt: Any) -> None:
        if isinstance(ckpt, dict):
            self._drop(checkpoint_id_of(ckpt), "its DynamoCheckpoint was deleted")

    def _updated(self, old: Any, new: Any) -> None:
        if isinstance(old, dict) and isinstance(new, dict) and artifact_version_of(old) != artifact_version_of(new):
            self._drop(checkpoint_id_of(old), "its artifact version changed")

    def sweep(self) -> int:
        """Drop the entries of checkpoint IDs that no DynamoCheckpoint has (deleted while no agent watched)."""
        known = {checkpoint_id_of(c) for c in self.checkpoints.store.list() if isinstance(c, dict)}
        gone = sorted({e.checkpoint_id for e in self.cache.entries()} - known)
        for checkpoint_id in gone:
            self._drop(checkpoint_id, "no DynamoCheckpoint has its checkpoint ID")
        return len(gone)

    # -- stage ---------------------------------------------------------------------------------------
    async def reconcile(self, key: ObjectKey) -> Result | None:
        if not self._swept:
            self._swept = True
            if dropped := self.sweep():
                log.info("node cache: dropped checkpoints that no longer exist", count=dropped)
        if key == _REPORT:
            await self.report()
            return Result(requeue_after=REPORT_PERIOD_S)
        ckpt = self.checkpoints.store.get_by_name(key.namespace, key.name)
        version = staging_for(ckpt, self.node_name) if isinstance(ckpt, dict) else None
        if version is None:
            return None
        result = await self.stage(checkpoint_id_of(ckpt), version, f"{key.namespace}/{key.name}")
        self.controller.enqueue(_REPORT)
        return result

    async def stage(self, checkpoint_id: str, version: str, name: str) -> Result | None:
        if (checkpoint_id, version) in self._refused or any(
                (e.checkpoint_id, e.version) == (checkpoint_id, version) for e in self.cache.entries()):
            return None
        if self.source is None:
            self._refused[(checkpoint_id, version)] = "podMount: no storage to read"
            log.info("pre-staging skipped: a podMount agent reads storage only through a pod's mount",
                     checkpoint=name, checkpoint_id=checkpoint_id)
            return None
        log.info("pre-staging a checkpoint", checkpoint=name, checkpoint_id=checkpoint_id, version=version)
        self._gauge(1)
        try:
            await self.source.stage(self.cache, checkpoint_id, version)
        except FillUnderWay as busy:  # a restore (or its follow-up fill) is caching it: wait, then look again
            log.info("pre-staging joins a fill under way", checkpoint=name, checkpoint_id=checkpoint_id)
            await anyio.to_thread.run_sync(busy.done.wait, abandon_on_cancel=True)
            return Result(requeue=True)
        except (ArtifactIncompatible, ArtifactInvalid, LargerThanBudget) as exc:  # until the agent is reconfigured
            self._refused[(checkpoint_id, version)] = str(exc)
            log.warning("pre-staging refused: not staged on this node", checkpoint=name, error=str(exc))
            self._count("refused")
            return None
        except NodeCacheFull as exc:
            log.warning("pre-staging postponed: the node cache is full", checkpoint=name, error=str(exc))
            self._count("postponed")
            return Result(requeue_after=RETRY_FULL_S)
        except (AgentError, OSError) as exc:
            log.warning("pre-staging failed; retried", checkpoint=name, error=str(exc))
            self._count("failed")
            return Result(requeue=True)
        finally:
            self._gauge(-1)
        log.info("pre-staged into the node cache", checkpoint=name, checkpoint_id=checkpoint_id, version=version)
        self._count("staged")
        return None

    def _gauge(self, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.staging_in_progress.inc(delta)  # a Gauge: +1 when a fetch starts, -1 when it ends

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.staging.labels(result).inc()

    # -- report --------------------------------------------------------------------------------------
    def entries(self) -> list[dict[str, str]]:
        return sorted(({"checkpointID": e.checkpoint_id, "version": e.version} for e in self.cache.entries()),
                      key=lambda e: (e["checkpointID"], e["version"]))

    async def report(self) -> None:
        """The node's staging Lease says what the cache holds (created, or replaced when it changed)."""
        entries = self.entries()
        if entries == self._reported or self.lease_namespace is None:
            return
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.lease_name, "namespace": self.lease_namespace,
                             # the admission policy lets the agent write only Leases carrying the ID label
                             "labels": {names.LABEL_STAGED_NODE: self.node_name, names.LABEL_CHECKPOINT_ID: ""},
                             "annotations": {names.ANN_STAGED: json.dumps(entries, separators=(",", ":"))}},
                "spec": {"holderIdentity": self.identity or self.node_name}}
        try:
            try:
                current = await self.client.get(LEASES, self.lease_name, self.lease_namespace)
            except NotFound:
                await self.client.create(LEASES, body, self.lease_namespace)
            else:
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                await self.client.update(LEASES, body, self.lease_namespace)
        except (AlreadyExists, Conflict):
            self.controller.enqueue(_REPORT)  # raced an earlier write of ours: again, from what is there now
            return
        except KubeError as exc:
            log.warning("staging report not written; retried", lease=self.lease_name, error=str(exc))
            return
        self._reported = entries
