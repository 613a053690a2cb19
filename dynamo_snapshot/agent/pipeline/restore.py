"""Restore of a checkpoint into a placeholder container on this node (SPEC section 7, node side).

    resolve   placeholder container -> its init (snapshot-init in standby)
    verify    manifest, checkpoint ID, compatibility, every file's size, the SHA-256 of every file but
              the raw page data; the page data (most of the bytes) is verified from here on in the
              background by parallel readers, ahead of CRIU's sequential reads
    pids      raise the placeholder's PID counter above the checkpoint's PIDs; wait until they are free
    rootfs    delete what the workload had deleted, then extract rootfs-diff.tar (confined)
    dev-shm   refill /dev/shm from dev-shm.tar
    criu      join the placeholder's cgroups, enter its mount/uts/ipc/net/pid namespaces and run CRIU
              there, from the agent's bundle; the restored subtree keeps its PIDs and, once CRIU exits,
              is re-parented to snapshot-init; its stdout/stderr become the placeholder's. Its tasks
              stay stopped until every page byte has passed; then they are let go. Once the page data
              is verified, the files the worker declared (``rereadAfterRestore``, its weights) are read
              into the page cache in the background, as the container sees them
    cuda      restore GPU state and unlock (no-op without CUDA)
    signal    restore-complete, naming the restored workload's PID, into the control directory

Any failure kills the placeholder's init, so the runtime restarts the container cleanly.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot import lifecycle
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact.pagecheck import PageCheck
from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.container import control, criu
from dynamo_snapshot.agent.container.runtime import ContainerInfo, CRIClient
from dynamo_snapshot.agent.cuda.step import CudaState, CudaStep, NoCuda
from dynamo_snapshot.agent.errors import RestoreError
from dynamo_snapshot.agent.host import cgroups, inroot, pids, procfs
from dynamo_snapshot.agent.pipeline.stages import Stages

log = structlog.get_logger(__name__)

# Joins the cgroups given before "--" (so the restored tasks land in the placeholder's), then execs the rest.
_JOIN_CGROUPS = 'while [ "$1" != "--" ]; do echo 0 > "$1" || exit 97; shift; done; shift; exec "$@"'


class Stage(enum.StrEnum):
    RESOLVE = "resolve"
    VERIFY = "verify"
    PIDS = "pids"
    ROOTFS = "rootfs"
    DEV_SHM = "dev-shm"
    CRIU = "criu"
    CUDA = "cuda"
    SIGNAL = "signal"


StageObserver = Callable[[Stage], Awaitable[None]]


@dataclass(frozen=True)
class RestoreRequest:
    container_id: str  # the placeholder
    checkpoint_id: str
    base_path: Path
    artifact_version: str = "1"
    work_dir: Path | None = None  # CRIU's restore.log and pidfile; default <base>/<id>/restores/<container>


@dataclass(frozen=True)
class RestoreResult:
    workload_pid: int  # PID of the restored subtree's root in the placeholder's namespace
    host_pid: int
    manifest: dict[str, Any]
    log_path: Path
    seconds: dict[str, float]  # per stage, one after the other
    background_seconds: dict[str, float] = field(default_factory=dict)  # work that overlapped the stages
    prefetch: Prefetch | None = None  # the declared files, still being read: .wait() for the result


def _resolve_placeholder(info: ContainerInfo) -> None:
    if not info.running:
        raise RestoreError(f"placeholder {info.name} ({info.id}) is {info.state}, not running")
    if not control.in_standby(info):
        raise RestoreError(f"placeholder {info.name} ({info.id}) is not in standby ({control.RESTORE_STANDBY_ENV}=1)")
    if control.control_dir(info) is None:
        raise RestoreError(f"placeholder {info.name} ({info.id}) has no {control.CONTROL_DIR_ENV}")


def _check_mounts(info: ContainerInfo, manifest: dict[str, Any]) -> set[str]:
    """The placeholder's mountpoints; each mount the checkpoint had must exist there."""
    mountpoints = {m.mountpoint for m in procfs.mountinfo(info.pid)}
    wanted = set(manifest.get("criu", {}).get("externalMounts", {}))
    if missing := sorted(wanted - mountpoints):
        raise RestoreError(f"placeholder {info.name} ({info.id}) lacks mounts the checkpoint had: {', '.join(missing)}")
    return mountpoints


def _open_present(paths: dict[str, Path | None]) -> dict[str, int]:
    """Open for reading those of ``paths`` (option -> path) that exist."""
    return {option: os.open(path, os.O_RDONLY) for option, path in paths.items() if path is not None and path.exists()}


async def _extract(info: ContainerInfo, archive: Path, deleted: Path | None, skip: set[str], within: str) -> None:
    fds = _open_present({"--archive-fd": archive, "--deleted-fd": deleted})
    try:
        if not fds:
            return
        command = ["extract", "--within", within]
        for path in sorted(skip - {"/"}):
            command += ["--skip", path]
        await inroot.run(str(procfs.proc(info.pid) / "root"), command, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def _open_stdio(info: ContainerInfo, recorded: list[str]) -> dict[str, int]:
    """Open the placeholder init's stdio for every pipe the workload's stdio was, so the restored
    workload writes into the placeholder's log (CRIU --inherit-fd)."""
    opened: dict[str, int] = {}
    for fd, target in enumerate(recorded[:3]):
        if not target.startswith("pipe:") or target in opened:
            continue
        flags = os.O_RDONLY if fd == 0 else os.O_WRONLY
        with contextlib.suppress(OSError):
            opened[target] = os.open(procfs.proc(info.pid) / "fd" / str(fd), flags)
    return opened


async def _run_criu(
    info: ContainerInfo,
    bundle: criu.CriuBundle,
    images: Path,
    work_dir: Path,
    manifest: dict[str, Any],
    settings: criu.CriuSettings,
    extra: list[str],
) -> None:
    opened: list[int] = []

    def keep(fd: int) -> int:
        opened.append(fd)
        return fd

    try:
        directory = os.O_RDONLY | os.O_DIRECTORY
        bundle_fd = keep(os.open(bundle.path, directory))
        images_fd = keep(os.open(images, directory))
        work_fd = keep(os.open(work_dir, directory))
        ns = procfs.proc(info.pid) / "ns"
        pid_ns_fd = keep(os.open(ns / "pid", os.O_RDONLY))
        net_ns_fd = keep(os.open(ns / "net", os.O_RDONLY))
        join = {kind: keep(os.open(ns / kind, os.O_RDONLY)) for kind in ("uts", "ipc")}
        stdio = _open_stdio(info, manifest.get("workload", {}).get("stdio", []))
        opened.extend(stdio.values())

        def ref(fd: int) -> str:  # how CRIU, inside the placeholder, reaches a descriptor we opened
            return f"/proc/self/fd/{fd}"

        options = criu.RestoreOptions.configured(
            settings,
            images_dir=ref(images_fd),
            work_dir=ref(work_fd),
            pid_ns_fd=pid_ns_fd,
            net_ns_fd=net_ns_fd,
            external_mounts={key: mountpoint for mountpoint, key in manifest["criu"]["externalMounts"].items()},
            inherited_fds=stdio,
            join_namespaces={kind: ref(fd) for kind, fd in join.items()},
        )
        argv = [
            "/bin/sh",
            "-c",
            _JOIN_CGROUPS,
            "sh",
            *map(str, cgroups.procs_files(info.pid)),
            "--",
            "nsenter",
            "--target",
            str(info.pid),
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            "--",
            *bundle.command(ref(bundle_fd)),
            *options.argv(),
            *extra,
        ]
        await criu.run("restore", argv, work_dir / options.log_file, pass_fds=opened)
    finally:
        for fd in opened:
            os.close(fd)


async def _prune(restores: Path, bound: Any) -> None:
    """Old restore logs go after a restore that worked (best effort: storage may be read-only)."""
    try:
        removed = await anyio.to_thread.run_sync(artifact.prune_restore_logs, restores)
    except OSError as exc:
        bound.warning("could not prune old restore logs", directory=str(restores), error=str(exc))
        return
    if removed:
        bound.info("pruned old restore logs", directory=str(restores), removed=len(removed))


def _declared_files(manifest: dict[str, Any]) -> list[str]:
    declared = manifest.get("workload", {}).get(control.REREAD_FIELD) or []
    return [p for p in declared if isinstance(p, str) and p.startswith("/")]


def _kill_placeholder(info: ContainerInfo) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGKILL)


async def restore(
    cri: CRIClient,
    request: RestoreRequest,
    bundle: criu.CriuBundle,
    cuda: CudaStep | None = None,
    observer: StageObserver | None = None,
    settings: criu.CriuSettings | None = None,
    io_threads: int | None = None,
    prefetch_threads: int = 8,
) -> RestoreResult:
    cuda = cuda or NoCuda()
    settings = settings or criu.CriuSettings()
    bound = log.bind(container_id=request.container_id, checkpoint_id=request.checkpoint_id)
    stages = Stages[Stage]("restore", bound, observer)
    enter, leave = stages.enter, stages.leave
    warm: Prefetch | None = None

    await enter(Stage.RESOLVE)
    info = await cri.container_info(request.container_id)
    try:
        _resolve_placeholder(info)
        layout = artifact.ArtifactLayout(request.base_path, request.checkpoint_id, request.artifact_version)
        restores = request.base_path / request.checkpoint_id / artifact.RESTORES
        work_dir = request.work_dir or restores / info.id
        leave(Stage.RESOLVE)

        await enter(Stage.VERIFY)
        node_cuda = await cuda.node_state()
        here = artifact.Compatibility.of_this_node(
            await anyio.to_thread.run_sync(bundle.version),
            node_cuda.driver_version,
            node_cuda.gpus,
            node_cuda.gpu_models,
        )
        images = layout.final_dir
        manifest = await anyio.to_thread.run_sync(artifact.verify_listing, images, request.checkpoint_id, here)
        await anyio.to_thread.run_sync(
            lambda: artifact.verify_digests(images, manifest, artifact.is_parsed, io_threads)
        )
        mountpoints = _check_mounts(info, manifest)
        recorded = CudaState.from_manifest(manifest)
        await cuda.check_restore(recorded, info.pid)  # GPUs the placeholder cannot provide: refuse now
        leave(Stage.VERIFY)

        pages = PageCheck(images, manifest, io_threads)
        async with lifecycle.background() as group:
            group.start_soon(pages.run)

            await enter(Stage.PIDS)
            await pids.reserve(info.pid, manifest["workload"]["pids"])
            leave(Stage.PIDS)

            await enter(Stage.ROOTFS)
            await _extract(info, images / artifact.ROOTFS_DIFF, images / artifact.DELETED_FILES, mountpoints, "/")
            leave(Stage.ROOTFS)

            await enter(Stage.DEV_SHM)
            await _extract(info, images / artifact.DEV_SHM, None, set(), "/dev/shm")
            leave(Stage.DEV_SHM)

            declared = _declared_files(manifest) if prefetch_threads > 0 else []
            if declared:  # the files as the restored worker will see them
                warm = Prefetch(declared, threads=prefetch_threads, root=procfs.proc(info.pid) / "root")
                group.start_soon(pages.then_prefetch, warm)

            await enter(Stage.CRIU)
            pages.check()
            work_dir.mkdir(parents=True, exist_ok=True)
            await _run_criu(info, bundle, images, work_dir, manifest, settings, ["--leave-stopped"])
            workload_pid = int((work_dir / "restored.pid").read_text())
            host_pid = procfs.tasks_in_pid_namespace(procfs.namespace_inode(info.pid, "pid")).get(workload_pid)
            if host_pid is None:
                raise RestoreError(f"restored workload PID {workload_pid} is not running in placeholder {info.name}")
            await pages.result()  # a bad page kills the placeholder, and the stopped tasks with it
            for member in procfs.process_tree(host_pid):  # every byte verified: let the restored tasks run
                os.kill(member, signal.SIGCONT)
            leave(Stage.CRIU)

        await enter(Stage.CUDA)
        await cuda.restore(procfs.process_tree(host_pid), recorded)
        leave(Stage.CUDA)

        await enter(Stage.SIGNAL)
        await control.signal_container(
            info,
            control.RESTORE_COMPLETE,
            {"checkpointID": request.checkpoint_id, "workloadPID": workload_pid},
        )
        leave(Stage.SIGNAL)
    except BaseException as exc:
        bound.error("restore failed", error=str(exc))
        if warm is not None:
            warm.stop()
        _kill_placeholder(info)
        raise
    await _prune(restores, bound)
    bound.info(
        "restored",
        workload_pid=workload_pid,
        seconds={k: round(v, 3) for k, v in stages.seconds.items()},
        verify_pages_seconds=round(pages.seconds, 3),
    )
    return RestoreResult(
        workload_pid=workload_pid,
        host_pid=host_pid,
        manifest=manifest,
        log_path=work_dir / "restore.log",
        seconds=stages.seconds,
        background_seconds={"verify-pages": pages.seconds},
        prefetch=warm,
    )
