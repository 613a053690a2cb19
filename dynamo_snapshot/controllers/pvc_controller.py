"""The PVC controller (SPEC section 6, podMount): every namespace with checkpoints has the checkpoint PVC.

Keyed by namespace. With `checkpoint.storage.pvc.create: true` it creates the PVC (again, if it is deleted
later); otherwise it verifies the PVC and says what is missing on the namespace's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from dynamo_snapshot.api import TERMINAL_PHASES, OperatorConfig, StorageAccessMode, names
from dynamo_snapshot.controllers.checkpoint.reconciler import checkpoint_informer
from dynamo_snapshot.controllers.common import FIELD_MANAGER, is_deleting, metadata
from dynamo_snapshot.controllers.pvc import build_storage_pvc
from dynamo_snapshot.controllers.storage import missing_pvc_message
from dynamo_snapshot.kube import (
    PERSISTENT_VOLUME_CLAIMS,
    AlreadyExists,
    Client,
    Controller,
    EventRecorder,
    Informer,
    InformerFactory,
    ObjectKey,
    Result,
)
from dynamo_snapshot.kube.resources import object_key

log = structlog.get_logger("dynamo_snapshot.controllers.pvc")

REASON_PVC_CREATED = "CheckpointStorageCreated"
REASON_PVC_MISSING = "CheckpointStorageMissing"


class PVCController:
    def __init__(self, client: Client, factory: InformerFactory, config: OperatorConfig, recorder: EventRecorder,
                 *, namespace: str | None = None):
        self.client = client
        self.config = config
        self.recorder = recorder
        self.pvc_name = config.checkpoint.storage.pvc.pvc_name
        self.checkpoints = checkpoint_informer(factory, namespace)
        self.pvcs: Informer[Any] = factory.informer(PERSISTENT_VOLUME_CLAIMS, namespace=namespace)
        self.users: list[tuple[Informer[Any], Callable[[Any], bool]]] = [(self.checkpoints, lambda _obj: True)]
        self.controller = Controller("checkpoint-storage", self.reconcile)
        self.controller.watch(self.checkpoints, mapper=self._namespace_key)
        self.controller.watch(self.pvcs, mapper=self._pvc_namespace_key)

    def add_users(self, informer: Informer[Any], needs_storage: Callable[[Any], bool]) -> None:
        """Objects of another kind whose namespaces need the PVC too (DGDs with checkpointing)."""
        self.users.append((informer, needs_storage))
        self.controller.watch(informer, mapper=self._namespace_key)

    @staticmethod
    def _namespace_key(obj: Any) -> list[ObjectKey]:
        return [ObjectKey(object_key(obj).namespace, "")]

    def _pvc_namespace_key(self, obj: Any) -> list[ObjectKey]:
        return self._namespace_key(obj) if metadata(obj).get("name") == self.pvc_name else []

    def _needs_storage(self, namespace: str) -> bool:
        return any(not is_deleting(obj) and needs(obj) for informer, needs in self.users
                   for obj in informer.store.by_index("namespace", namespace))

    async def reconcile(self, key: ObjectKey) -> Result | None:
        storage = self.config.checkpoint.storage
        namespace = key.namespace
        if storage.type != names.STORAGE_TYPE_PVC or storage.access_mode is not StorageAccessMode.POD_MOUNT:
            return None
        pvc = self.pvcs.store.get_by_name(namespace, self.pvc_name)
        # The PVC first: every checkpoint event of the namespace lands here, and scanning the namespace's
        # objects each time made a burst of N checkpoints cost N^2.
        if (pvc is not None and not is_deleting(pvc)) or not self._needs_storage(namespace):
            return None
        undecided = [c for c in self.checkpoints.store.by_index("namespace", namespace)
                     if c.status.phase not in TERMINAL_PHASES and not is_deleting(c)]  # Malformed: typed status too
        if not storage.pvc.create:
            message = missing_pvc_message(namespace, self.pvc_name)
            log.warning("checkpoint storage missing", namespace=namespace, pvc=self.pvc_name, error=message)
            for ckpt in undecided:
                await self.recorder.warning(ckpt, REASON_PVC_MISSING, message)
            return None
        if pvc is not None:
            return None  # still terminating; its final deletion brings us back to create it again
        try:
            await self.client.create(PERSISTENT_VOLUME_CLAIMS, build_storage_pvc(namespace, self.config), namespace,
                                     field_manager=FIELD_MANAGER)
        except AlreadyExists:
            return None
        log.info("created checkpoint storage", namespace=namespace, pvc=self.pvc_name)
        for ckpt in undecided:
            await self.recorder.normal(ckpt, REASON_PVC_CREATED,
                                       f"created checkpoint storage PVC {namespace}/{self.pvc_name}")
        return None
