"""The node side of the agent's operations, behind one small interface: run the checkpoint or restore
pipeline for a container, or kill a workload that cannot be checkpointed. ``CriuNode`` is the real one
(CRI + CRIU + the CUDA step); the daemon's tests substitute a fake, so the Kubernetes protocol can be
tested without a container runtime.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from dynamo_snapshot.agent.artifact import authn, beneath
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.artifact.storage import StorageResolver
from dynamo_snapshot.agent.container import control, criu
from dynamo_snapshot.agent.container.runtime import ContainerInfo, ContainerNotFound, CRIClient
from dynamo_snapshot.agent.cuda.step import CudaStep, NoCuda
from dynamo_snapshot.agent.errors import CheckpointError, RestoreError
from dynamo_snapshot.agent.host.cgroups import Freezer
from dynamo_snapshot.agent.pipeline import checkpoint as ckpt
from dynamo_snapshot.agent.pipeline import guard
from dynamo_snapshot.agent.pipeline import restore as rst
from dynamo_snapshot.agent.pipeline.containers import ContainerTarget, PlaceholderTarget
from dynamo_snapshot.agent.pipeline.hooks import Hooks
from dynamo_snapshot.agent.service.config import RestoreSettings
from dynamo_snapshot.agent.service.podwork import CheckpointWork, RestoreWork
from dynamo_snapshot.api import names

log = structlog.get_logger(__name__)


class NodeOps(Protocol):
    async def checkpoint(self, work: CheckpointWork, hooks: Hooks) -> ckpt.CheckpointResult:
        """Checkpoint the work's container; ``hooks.confirm`` runs after the promotion (failing it fails
        the checkpoint), ``hooks.dump_started`` when CRIU's dump begins. On failure the workload is
        killed and no promoted directory is left."""
        ...

    async def restore(self, work: RestoreWork) -> rst.RestoreResult:
        """Restore into the work's placeholder; on failure the placeholder is killed."""
        ...

    async def restore_finished(self, container_id: str) -> bool:
        """Whether a restore into this running placeholder got to its end (``restore-complete`` is in
        its control directory): an agent that restarted after that point must not undo it."""
        ...

    async def settle_source(self, work: CheckpointWork, completed: bool) -> ckpt.Settled:
        """A source whose checkpoint pipeline an earlier agent was killed in: with ``completed`` (the Job's
        verdict) finish its release, else kill it if the dump had begun on it (``ckpt.settle_source``)."""
        ...

    async def kill_workload(self, container_id: str) -> None:
        """Kill every process of a checkpoint source container but its init (which then exits)."""
        ...

    async def kill_container(self, container_id: str) -> None:
        """Kill a container's init, so the kubelet restarts (or fails) it."""
        ...

    async def refuse_restore(self, container_id: str, reason: str) -> None:
        """Tell a running placeholder its restore is refused for good (``restore-failed`` with the reason):
        it starts its workload cold or keeps waiting, as its pod is set. Raises when it cannot be told."""
        ...


def _drop_uploaded(base: Path, checkpoint_id: str, version: str) -> None:
    """Object storage: the version a checkpoint wrote below the node-local base before its upload, removed
    once the checkpoint is confirmed (it is outside the node cache's budget; a restore on this node fetches
    it into the cache like any other). Confined to the base, symlinks unlinked, never followed."""
    versions = base / checkpoint_id / names.VERSIONS_DIR
    try:
        beneath.remove_children(base, versions, [version])
        for parent, name in ((versions, names.STAGING_DIR), (versions.parent, names.VERSIONS_DIR)):
            with beneath.directory(base, parent) as fd, contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=fd)  # only when empty: another attempt's files stay
    except (OSError, beneath.UnsafePath) as exc:
        log.warning("the uploaded version's node-local copy was not removed", checkpoint_id=checkpoint_id,
                    version=version, error=str(exc))
        return
    log.info("uploaded version's node-local copy removed", checkpoint_id=checkpoint_id, version=version)


class CriuNode:
    def __init__(self, cri: CRIClient, bundle: criu.CriuBundle, storage: StorageResolver,
                 settings: criu.CriuSettings, cuda: CudaStep | None = None,
                 restore: RestoreSettings | None = None, keyring: authn.Keyring | None = None,
                 cache: NodeCache | None = None, remote: ObjectStorage | None = None):
        self.cri = cri
        self.bundle = bundle
        self.storage = storage
        self.settings = settings
        self.cuda = cuda or NoCuda()
        self.restore_settings = restore or RestoreSettings()
        self.keyring = keyring or authn.default_keyring()
        self.cache = cache  # the node-local checkpoint cache, when configured
        self.remote = remote  # object storage: uploaded after the promotion, fetched before the verification
        self._foreign: set[str] = set()  # containers refused as not the pod's (or not a placeholder): never killed

    async def _check_owned(self, work: CheckpointWork | RestoreWork, info: ContainerInfo, placeholder: bool) -> None:
        """The container is the pod's, by the runtime's word (its sandbox's pod UID, namespace, name and
        the container's name; pod status can be patched by others), and for a restore a placeholder in
        standby. Otherwise it is remembered as foreign, so nothing kills it, and refused."""
        meta = (await self.cri.sandbox_status(info.sandbox_id)).status.metadata
        why = ""
        if (meta.uid, meta.namespace, meta.name) != (work.pod.uid, work.pod.namespace, work.pod.name):
            why = f"belongs to pod {meta.namespace}/{meta.name} (uid {meta.uid}), not {work.pod}"
        elif info.name != work.container:
            why = f"is container {info.name!r} of the pod, not {work.container!r}"
        elif placeholder and not control.in_standby(info):
            why = f"is not a placeholder in standby ({control.RESTORE_STANDBY_ENV}=1); it is left running"
        if why:
            self._foreign.add(work.container_id)
            log.warning("container refused", namespace=work.pod.namespace, name=work.pod.name,
                        container_id=work.container_id, reason=why)
            error = RestoreError if placeholder else CheckpointError
            raise error(f"container {work.container_id} {why}; refused")

    def _check_storage_type(self, work: CheckpointWork | RestoreWork, error: type[Exception]) -> None:
        """The operator and this agent agree on where checkpoints are (pvc or s3), or the pod is refused."""
        mine = names.STORAGE_TYPE_S3 if self.remote is not None else names.STORAGE_TYPE_PVC
        if work.storage_type and work.storage_type != mine:
            raise error(f"pod {work.pod} is for {work.storage_type} storage ({names.ANN_STORAGE_TYPE}) but this "
                        f"agent's storage.type is {mine}: set the operator's checkpoint.storage.type and the "
                        "snapshot chart's storage.type alike")

    async def checkpoint(self, work: CheckpointWork, hooks: Hooks) -> ckpt.CheckpointResult:
        self._check_storage_type(work, CheckpointError)
        info = await self.cri.container_info(work.container_id)  # the one lookup, handed down
        await self._check_owned(work, info, placeholder=False)
        async with self.storage.open(info, work.checkpoint_id, work.base_path) as base:
            request = ckpt.CheckpointRequest(work.checkpoint_id, base, work.artifact_version, keyring=self.keyring,
                                           remote=self.remote, namespace=work.pod.namespace)
            target = ContainerTarget(self.cri, work.container_id, info)
            result = await ckpt.checkpoint(target, request, self.bundle, self.cuda, hooks, self.settings)
            if self.remote is not None:  # confirmed in the bucket: the node-local copy has served its purpose
                await anyio.to_thread.run_sync(_drop_uploaded, base, work.checkpoint_id, result.directory.name)
            return result

    async def restore(self, work: RestoreWork) -> rst.RestoreResult:
        self._check_storage_type(work, RestoreError)
        info = await self.cri.container_info(work.container_id)  # the one lookup, handed down
        await self._check_owned(work, info, placeholder=True)
        async with self.storage.open(info, work.checkpoint_id, work.base_path) as base:
            tuned = self.restore_settings
            request = rst.RestoreRequest(work.checkpoint_id, base, work.artifact_version,
                                         io_threads=tuned.verify_threads, keyring=self.keyring,
                                         prefetch_threads=tuned.prefetch_threads,
                                         private_root=Path(tuned.private_dir), cache=self.cache,
                                         remote=self.remote, namespace=work.pod.namespace)
            target = PlaceholderTarget(self.cri, work.container_id, info)
            return await rst.restore(target, request, self.bundle, self.cuda, settings=self.settings)

    async def settle_source(self, work: CheckpointWork, completed: bool) -> ckpt.Settled:
        info = await self._running(work.container_id) if work.container_id else None
        if info is None:
            return ckpt.Settled.GONE
        await self._check_owned(work, info, placeholder=False)
        freezer = Freezer.of_process(info.pid)
        if left := await anyio.to_thread.run_sync(guard.wait_for_guards, freezer.path):
            log.warning("an earlier agent's checkpoint guard is still running", container_id=work.container_id,
                        pids=left)
        told = (work.checkpoint_id, work.artifact_version) if completed else None
        return await ckpt.settle_source(ContainerTarget(self.cri, work.container_id, info), self.cuda, told)

    async def restore_finished(self, container_id: str) -> bool:
        info = await self._running(container_id)
        if info is None:
            return False
        try:
            return await control.read_signal(info, control.RESTORE_COMPLETE) is not None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the placeholder's control directory", container_id=container_id, error=str(exc))
            return False

    async def _running(self, container_id: str) -> ContainerInfo | None:
        try:
            info = await self.cri.container_info(container_id)
        except ContainerNotFound:
            return None
        return info if info.running else None

    async def kill_workload(self, container_id: str) -> None:
        if container_id in self._foreign:
            return
        if info := await self._running(container_id):
            freezer = Freezer.of_process(info.pid)
            killed = freezer.kill_all_but(info.pid)
            freezer.thaw()
            log.info("workload killed", container_id=container_id, pids=killed)

    async def refuse_restore(self, container_id: str, reason: str) -> None:
        if container_id in self._foreign:
            raise RestoreError(f"container {container_id} was refused as not the pod's placeholder; not told")
        if (info := await self._running(container_id)) is None:
            raise RestoreError(f"container {container_id} is not running")
        await control.signal_container(info, control.RESTORE_FAILED, {"reason": reason})

    async def kill_container(self, container_id: str) -> None:
        if container_id in self._foreign:
            log.info("container not killed: it was refused as not the pod's placeholder", container_id=container_id)
            return
        if info := await self._running(container_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGKILL)
            log.info("container killed", container_id=container_id, pid=info.pid)
