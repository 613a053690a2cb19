"""Checkpoint of one container's workload on this node (SPEC section 7, without the Kubernetes side).

    resolve   container -> its init (snapshot-init) -> the one workload subtree below it; the files the
              worker declared in ready-for-snapshot for a restore to prefetch
    cuda      lock and checkpoint the subtree's CUDA processes (no-op without CUDA)
    freeze    freeze the container's cgroup
    dump      CRIU dump of the subtree: external net and PID namespaces, every mount external,
              file locks, established TCP; CRIU leaves the cgroup frozen
    rootfs    overlay upper dir -> rootfs-diff.tar + deleted-files.json (still frozen)
    dev-shm   /dev/shm contents -> dev-shm.tar (still frozen)
    manifest  every file's size and SHA-256, written last
    promote   one rename from versions/tmp/<uuid> to versions/<artifactVersion>
    confirm   the caller's confirmation (the agent annotates the checkpoint Job), still frozen
    release   thaw; then tell the workload snapshot-complete

A guard process (``guard.py``) is armed before the first step that changes the workload: if the
pipeline fails or dies before the promotion, the workload is killed and thawed and the staging
directory removed, so nothing is left frozen, stopped or half-promoted. Between the promotion and the
confirmation the guard also takes the promoted version back out of ``versions/``: an unconfirmed
checkpoint must not be restored from, nor block the next attempt.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import control, criu, rootfs
from dynamo_snapshot.agent.container.runtime import ContainerInfo, CRIClient
from dynamo_snapshot.agent.cuda.step import CudaStep, NoCuda
from dynamo_snapshot.agent.errors import CheckpointError, CriuFailed
from dynamo_snapshot.agent.host import inroot, procfs
from dynamo_snapshot.agent.host.cgroups import Freezer
from dynamo_snapshot.agent.pipeline.guard import Guard
from dynamo_snapshot.agent.pipeline.stages import Stages

log = structlog.get_logger(__name__)

_UNSAFE_MOUNT_CHARS = set("[]:,")


class Stage(enum.StrEnum):
    RESOLVE = "resolve"
    CUDA = "cuda"
    FREEZE = "freeze"
    DUMP = "dump"
    DUMP_RUNNING = "dump-running"  # CRIU has started and not finished
    ROOTFS = "rootfs"
    DEV_SHM = "dev-shm"
    MANIFEST = "manifest"
    PROMOTE = "promote"
    CONFIRM = "confirm"
    RELEASE = "release"


StageObserver = Callable[[Stage], Awaitable[None]]
Confirm = Callable[[Path], Awaitable[None]]  # gets the promoted directory


@dataclass(frozen=True)
class CheckpointRequest:
    container_id: str
    checkpoint_id: str
    base_path: Path
    artifact_version: str = "1"


@dataclass(frozen=True)
class CheckpointResult:
    directory: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]  # per stage
    workload_notified: bool


@dataclass(frozen=True)
class Source:
    """Everything the dump needs to know about the source container, read before touching it."""

    info: ContainerInfo
    init_pid: int  # host PID of snapshot-init
    root_pid: int  # host PID of the workload subtree's root
    tasks: dict[int, int]  # PID in the container -> host TID, every thread of the subtree
    external_mounts: dict[str, str]  # mountpoint -> key
    freezer: Freezer
    upper_dir: Path
    net_ns: int
    pid_ns: int
    stdio: list[str]


async def resolve_source(cri: CRIClient, container_id: str) -> Source:
    info = await cri.container_info(container_id)
    if not info.running:
        raise CheckpointError(f"container {info.name} ({container_id}) is {info.state}, not running")
    kids = procfs.children(info.pid)
    if len(kids) != 1:
        raise CheckpointError(
            f"container {info.name} ({container_id}): its init (host PID {info.pid}) has {len(kids)} children; "
            "a checkpoint needs exactly one workload process below snapshot-init"
        )
    root = kids[0]
    tasks: dict[int, int] = {}
    for pid in procfs.process_tree(root):
        for tid in procfs.threads(pid):
            tasks[procfs.ns_pid(tid, pid)] = tid
    mounts = procfs.mountinfo(root)
    external: dict[str, str] = {}
    for mount in mounts:
        if mount.mountpoint == "/":
            continue
        if _UNSAFE_MOUNT_CHARS & set(mount.mountpoint):
            raise CheckpointError(f"container {info.name}: cannot externalize mount {mount.mountpoint!r} for CRIU")
        if mount.mountpoint in external:
            raise CheckpointError(f"container {info.name}: {mount.mountpoint} is mounted more than once")
        external[mount.mountpoint] = mount.mountpoint
    stdio = []
    for fd in (0, 1, 2):
        try:
            stdio.append(procfs.fd_target(root, fd))
        except FileNotFoundError:
            stdio.append("")
    return Source(
        info=info,
        init_pid=info.pid,
        root_pid=root,
        tasks=tasks,
        external_mounts=external,
        freezer=Freezer.of_process(root),
        upper_dir=rootfs.overlay_upper_dir(root),
        net_ns=procfs.namespace_inode(root, "net"),
        pid_ns=procfs.namespace_inode(root, "pid"),
        stdio=stdio,
    )


async def _archive_dev_shm(source: Source, out: Path) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        await inroot.run(
            str(procfs.proc(source.root_pid) / "root"), ["archive", "--source", "/dev/shm"], {"--archive-fd": fd}
        )
    finally:
        os.close(fd)


async def checkpoint(
    cri: CRIClient,
    request: CheckpointRequest,
    bundle: criu.CriuBundle,
    cuda: CudaStep | None = None,
    observer: StageObserver | None = None,
    settings: criu.CriuSettings | None = None,
    confirm: Confirm | None = None,
) -> CheckpointResult:
    cuda = cuda or NoCuda()
    settings = settings or criu.CriuSettings()
    bound = log.bind(container_id=request.container_id, checkpoint_id=request.checkpoint_id)
    stages = Stages[Stage]("checkpoint", bound, observer)
    enter, leave = stages.enter, stages.leave

    await enter(Stage.RESOLVE)
    source = await resolve_source(cri, request.container_id)
    try:
        reread = await control.read_reread_declaration(source.info)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"container {source.info.name}: cannot read ready-for-snapshot: {exc}") from exc
    layout = artifact.ArtifactLayout(request.base_path, request.checkpoint_id, request.artifact_version)
    criu_version = await anyio.to_thread.run_sync(bundle.version)
    staging = layout.new_staging()
    leave(Stage.RESOLVE)

    kept_log = layout.failed_log(staging)
    guard = await Guard.start(source.freezer, source.init_pid, staging, kept_log)
    final: Path | None = None
    try:
        await enter(Stage.CUDA)
        host_to_vpid = {tid: vpid for vpid, tid in source.tasks.items()}
        await cuda.prepare(sorted(set(source.tasks.values())))
        cuda_state = await cuda.checkpoint()
        leave(Stage.CUDA)

        await enter(Stage.FREEZE)
        await anyio.to_thread.run_sync(source.freezer.freeze)
        leave(Stage.FREEZE)

        await enter(Stage.DUMP)
        options = criu.DumpOptions.configured(
            settings,
            pid=source.root_pid,
            images_dir=staging,
            freeze_cgroup=source.freezer.path,
            net_ns_inode=source.net_ns,
            pid_ns_inode=source.pid_ns,
            external_mounts=source.external_mounts,
        )

        async def dump_started(pid: int) -> None:
            await guard.watch(pid)
            await stages.notify(Stage.DUMP_RUNNING)

        # CRIU runs in the container's UTS and IPC namespaces (host mount, PID and network ones): what it
        # shares with the workload it does not record, so a restore leaves the workload in the
        # placeholder's UTS and IPC namespaces (its hostname is the restore pod's) instead of creating
        # new ones, which would need a writable /proc/sys the kubelet does not give containers.
        shared = ["nsenter", "--target", str(source.init_pid), "--uts", "--ipc", "--"]
        await criu.run(
            "dump", [*shared, *bundle.command(), *options.argv()], staging / options.log_file, on_started=dump_started
        )
        leave(Stage.DUMP)

        await enter(Stage.ROOTFS)
        archived, deleted = await anyio.to_thread.run_sync(
            rootfs.capture,
            source.upper_dir,
            set(source.external_mounts),
            staging / artifact.ROOTFS_DIFF,
            staging / artifact.DELETED_FILES,
        )
        leave(Stage.ROOTFS)

        await enter(Stage.DEV_SHM)
        if "/dev/shm" in source.external_mounts:
            await _archive_dev_shm(source, staging / artifact.DEV_SHM)
        leave(Stage.DEV_SHM)

        await enter(Stage.MANIFEST)
        compatibility = artifact.Compatibility.of_this_node(
            criu_version, cuda_state.driver_version, cuda_state.gpus, cuda_state.gpu_models
        )
        fields = {
            "checkpointID": request.checkpoint_id,
            "artifactVersion": request.artifact_version,
            "createdAt": artifact.now_rfc3339(),
            "compatibility": compatibility.to_json(),
            "workload": {
                "containerName": source.info.name,
                "image": source.info.image,
                "rootPID": host_to_vpid[source.root_pid],
                "pids": sorted(source.tasks),
                "stdio": source.stdio,
                "rootfsEntries": archived,
                "deletedPaths": deleted,
                control.REREAD_FIELD: reread,
            },
            "criu": {"externalMounts": source.external_mounts, "dumpArgv": options.argv()},
            "cuda": cuda_state.manifest_block(host_to_vpid.get),
        }
        manifest = await anyio.to_thread.run_sync(artifact.write_manifest, staging, fields)
        leave(Stage.MANIFEST)

        await enter(Stage.PROMOTE)
        final = await anyio.to_thread.run_sync(layout.promote, staging)
        await guard.promoted(final)
        leave(Stage.PROMOTE)

        await enter(Stage.CONFIRM)
        if confirm is not None:
            await confirm(final)
        await guard.confirmed()
        leave(Stage.CONFIRM)
    except BaseException as exc:
        bound.error("checkpoint failed; killing the workload", error=str(exc))
        with anyio.CancelScope(shield=True):
            try:
                # Kill first: the workload may be frozen, and undoing a CUDA lock needs it running.
                await guard.trip()
            finally:
                await cuda.abort()
        if isinstance(exc, CriuFailed) and kept_log.exists():
            exc.log_path = str(kept_log)
        raise

    await enter(Stage.RELEASE)
    # Thaw before disarming: dying in between leaves a killed workload, never a frozen one.
    source.freezer.thaw()
    await guard.disarm()
    try:
        await cuda.release()  # a CUDA-locked source would hang in its first CUDA call, exit handlers included
    except Exception as exc:
        bound.error("the source did not get its GPU state back; killing it (the checkpoint is stored)", error=str(exc))
        source.freezer.kill_all_but(source.init_pid)
    notified = True
    try:
        await control.signal_container(
            source.info,
            control.SNAPSHOT_COMPLETE,
            {"checkpointID": request.checkpoint_id, "artifactVersion": request.artifact_version},
        )
    except (OSError, ValueError, inroot.InRootError) as exc:
        notified = False
        bound.warning("checkpoint stored but the workload was not told", error=str(exc))
    leave(Stage.RELEASE)
    bound.info("checkpoint stored", directory=str(final), seconds={k: round(v, 3) for k, v in stages.seconds.items()})
    return CheckpointResult(directory=final, manifest=manifest, seconds=stages.seconds, workload_notified=notified)
