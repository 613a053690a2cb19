"""The staging controller: writes `status.staging` of each Ready DynamoCheckpoint that something restores from.

    keyed by     DynamoCheckpoint
    consumers    the ReplicaSets of DGD generations whose pod template restores this checkpoint ID
                 (restore-shaped: the checkpoint-ID label, not a checkpoint source)
    gpu          the GPU product and driver labels of the node the checkpoint Job's pod ran on, recorded
                 once (the pod may be gone later)
    nodes        placement.choose_nodes over the cluster's Nodes, at most `checkpoint.staging.maxNodes`
    staged       the nodes whose agent reports this version in its node cache (the per-node Leases
                 `snapshot-staged-<node>`, annotation `nvidia.com/snapshot-staged`)
    write        a merge patch of `status.staging` (with the resourceVersion) only when it changed; a
                 checkpoint that is not Ready, or that nothing restores from and nobody holds, gets none

The agents read `status.staging.nodes` (agent/service/staging.py) and report on their own Lease; the operator
never writes to a node and the agent never writes a DynamoCheckpoint (docs/security.md).
"""

from __future__ import annotations

import json
from typing import Any

import structlog

from dynamo_snapshot.api import DynamoCheckpoint, Malformed, OperatorConfig, Phase, Staging, names, to_dict
from dynamo_snapshot.controllers.checkpoint.ids import MissingAutoCheckpointID, artifact_version, resolve_checkpoint_id
from dynamo_snapshot.controllers.checkpoint.reconciler import (
    CHECKPOINT_ID_INDEX,
    checkpoint_informer,
    index_by_resolved_id,
)
from dynamo_snapshot.controllers.common import REPLICASETS, is_deleting, metadata
from dynamo_snapshot.controllers.staging.placement import NodeView, choose_nodes, gpu_of
from dynamo_snapshot.kube import (
    DYNAMO_CHECKPOINTS,
    LEASES,
    NODES,
    PODS,
    Client,
    Controller,
    Informer,
    InformerFactory,
    ObjectKey,
    index_by_label,
)

log = structlog.get_logger("dynamo_snapshot.controllers.staging")

RESTORE_ID_INDEX = "restoreCheckpointID"
SOURCE_JOB_INDEX = "stagingSourceJob"  # an index of its own: the checkpoint controller's is another function
_by_job_name = index_by_label(names.LABEL_JOB_NAME)


def _template_labels(rs: Any) -> dict[str, str]:
    return ((rs.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}


def _index_by_restored_id(rs: Any) -> list[str]:
    """A ReplicaSet whose pods restore a checkpoint: filed under its checkpoint ID."""
    labels = _template_labels(rs)
    if labels.get(names.LABEL_IS_CHECKPOINT_SOURCE) == "true" or not labels.get(names.LABEL_CHECKPOINT_ID):
        return []
    return [labels[names.LABEL_CHECKPOINT_ID]]


def staged_versions(lease: Any) -> set[tuple[str, str]]:
    """(checkpoint ID, version) pairs an agent's staging Lease reports; a garbled annotation reports none."""
    try:
        listed = json.loads((metadata(lease).get("annotations") or {}).get(names.ANN_STAGED, "[]"))
        return {(str(e["checkpointID"]), str(e["version"])) for e in listed}
    except (ValueError, TypeError, KeyError):
        return set()


def staging_patch(staging: Staging | None) -> dict[str, Any] | None:
    """`status.staging` as a merge patch: every field given, so none of the old one is left behind."""
    if staging is None:
        return None
    return {"artifactVersion": staging.artifact_version, "nodes": staging.nodes, "staged": staging.staged,
            "gpu": to_dict(staging.gpu) if staging.gpu is not None else None}


class StagingController:
    def __init__(self, client: Client, factory: InformerFactory, config: OperatorConfig, *,
                 namespace: str | None = None):
        self.client = client
        self.limit = config.checkpoint.staging.max_nodes
        self.checkpoints = checkpoint_informer(factory, namespace, {CHECKPOINT_ID_INDEX: index_by_resolved_id})
        self.replicasets: Informer[Any] = factory.informer(
            REPLICASETS, namespace=namespace, label_selector=names.LABEL_DGD_NAME,
            indexers={RESTORE_ID_INDEX: _index_by_restored_id})
        self.nodes: Informer[Any] = factory.informer(NODES)
        # the agents' staging Leases share the checkpoint controller's informer (label selected)
        self.leases: Informer[Any] = factory.informer(LEASES, namespace=namespace,
                                                      label_selector=names.LABEL_CHECKPOINT_ID)
        self.source_pods: Informer[Any] = factory.informer(
            PODS, namespace=namespace, label_selector=f"{names.LABEL_IS_CHECKPOINT_SOURCE}=true",
            indexers={SOURCE_JOB_INDEX: _by_job_name})
        self.controller = Controller("staging", self.reconcile)
        self.controller.watch(self.checkpoints)
        self.controller.watch(self.replicasets, mapper=self._by_template_id)
        self.controller.watch(self.source_pods, mapper=self._by_label_id)
        self.controller.watch(self.nodes, mapper=self._ready_checkpoints)
        self.controller.watch(self.leases, mapper=self._ready_checkpoints_if_staging_lease)

    # -- mapping -------------------------------------------------------------------------------------
    def _keys_of_id(self, namespace: str, checkpoint_id: str) -> list[ObjectKey]:
        return [ObjectKey(c.metadata.namespace, c.metadata.name)
                for c in self.checkpoints.store.by_index(CHECKPOINT_ID_INDEX, checkpoint_id)
                if c.metadata.namespace == namespace]

    def _by_template_id(self, rs: Any) -> list[ObjectKey]:
        namespace = metadata(rs).get("namespace", "")
        return [k for cid in _index_by_restored_id(rs) for k in self._keys_of_id(namespace, cid)]

    def _by_label_id(self, obj: Any) -> list[ObjectKey]:
        cid = (metadata(obj).get("labels") or {}).get(names.LABEL_CHECKPOINT_ID, "")
        return self._keys_of_id(metadata(obj).get("namespace", ""), cid) if cid else []

    def _ready_checkpoints(self, _obj: Any) -> list[ObjectKey]:
        return [ObjectKey(c.metadata.namespace, c.metadata.name) for c in self.checkpoints.store.list()
                if isinstance(c, DynamoCheckpoint) and (c.status.phase is Phase.READY or c.status.staging)]

    def _ready_checkpoints_if_staging_lease(self, lease: Any) -> list[ObjectKey]:
        labels = metadata(lease).get("labels") or {}
        return self._ready_checkpoints(lease) if names.LABEL_STAGED_NODE in labels else []

    # -- deciding ------------------------------------------------------------------------------------
    def _staged_on(self, checkpoint_id: str, version: str) -> list[str]:
        return sorted(
            (metadata(lease).get("labels") or {})[names.LABEL_STAGED_NODE] for lease in self.leases.store.list()
            if names.LABEL_STAGED_NODE in (metadata(lease).get("labels") or {})
            and (checkpoint_id, version) in staged_versions(lease))

    def _source_gpu(self, ckpt: DynamoCheckpoint) -> Any:
        for pod in self.source_pods.store.by_index(SOURCE_JOB_INDEX, ckpt.status.job_name):
            if metadata(pod).get("namespace") != ckpt.metadata.namespace:
                continue
            node = self.nodes.store.get_by_name("", (pod.get("spec") or {}).get("nodeName", ""))
            if node is not None and (gpu := gpu_of(NodeView.of(node))) is not None:
                return gpu
        return None

    def desired(self, ckpt: DynamoCheckpoint) -> Staging | None:
        try:
            checkpoint_id = resolve_checkpoint_id(ckpt)
        except MissingAutoCheckpointID:
            return None
        if ckpt.status.phase is not Phase.READY or is_deleting(ckpt):
            return None
        version = artifact_version(ckpt)
        old = ckpt.status.staging if ckpt.status.staging and ckpt.status.staging.artifact_version == version else None
        gpu = old.gpu if old is not None and old.gpu is not None else self._source_gpu(ckpt)
        consumers = [((rs.get("spec") or {}).get("template") or {}).get("spec") or {}
                     for rs in self.replicasets.store.by_index(RESTORE_ID_INDEX, checkpoint_id)
                     if metadata(rs).get("namespace") == ckpt.metadata.namespace and not is_deleting(rs)]
        nodes = choose_nodes(consumers, (NodeView.of(n) for n in self.nodes.store.list()), limit=self.limit,
                             gpu=gpu, previous=old.nodes if old is not None else ())
        staged = self._staged_on(checkpoint_id, version)
        if not nodes and not staged:
            return None
        return Staging(artifact_version=version, nodes=nodes, staged=staged, gpu=gpu)

    async def reconcile(self, key: ObjectKey) -> None:
        ckpt = self.checkpoints.store.get_by_name(key.namespace, key.name)
        if ckpt is None or isinstance(ckpt, Malformed):
            return
        wanted = self.desired(ckpt)
        if wanted == ckpt.status.staging:
            return
        patch = {"metadata": {"resourceVersion": ckpt.metadata.resource_version},
                 "status": {"staging": staging_patch(wanted)}}
        await self.client.patch_status(DYNAMO_CHECKPOINTS, key.name, patch, key.namespace)
        log.info("checkpoint staging", namespace=key.namespace, name=key.name,
                 nodes=wanted.nodes if wanted else [], staged=wanted.staged if wanted else [])
