"""Checkpoint storage as the operator's caches see it: the agent DaemonSets and the PVCs of a namespace."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.api import OperatorConfig, names
from dynamo_snapshot.controllers.common import DAEMONSETS, metadata
from dynamo_snapshot.controllers.storage import Storage, resolve_storage
from dynamo_snapshot.kube import PERSISTENT_VOLUME_CLAIMS, Informer, InformerFactory


class StorageView:
    def __init__(self, factory: InformerFactory, config: OperatorConfig, *, namespace: str | None = None):
        self.config = config
        self.daemonsets: Informer[Any] = factory.informer(
            DAEMONSETS, namespace=namespace,
            label_selector=f"{names.LABEL_APP_COMPONENT}={names.AGENT_COMPONENT}")
        self.pvcs: Informer[Any] = factory.informer(PERSISTENT_VOLUME_CLAIMS, namespace=namespace)

    def resolve(self, namespace: str) -> Storage:
        """Raises StorageUnavailable / StorageNotReady (controllers.storage) when there is none yet."""
        return resolve_storage(
            namespace, self.config,
            daemonsets=self.daemonsets.store.by_index("namespace", namespace),
            pvc_names=[metadata(p)["name"] for p in self.pvcs.store.by_index("namespace", namespace)])
