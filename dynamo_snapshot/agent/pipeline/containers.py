"""The container targets: a checkpoint source container and a restore placeholder, both resolved
through CRI once (``resolve``) and then acted on through their init's host PID.

    ContainerTarget.resolve     container -> snapshot-init -> the one workload subtree below it; its
                                threads, mounts (all external to CRIU), overlay upper dir, namespaces;
                                the files the worker declared in ready-for-snapshot
    PlaceholderTarget.resolve   placeholder -> snapshot-init in standby, with a control directory

CRIU runs in the source's UTS and IPC namespaces and, on restore, in all the placeholder's namespaces
and cgroups (see ``_restore_argv``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.artifact import layout
from dynamo_snapshot.agent.container import control, criu, privilege, rootfs
from dynamo_snapshot.agent.container.runtime import ContainerInfo, CRIClient
from dynamo_snapshot.agent.errors import CheckpointError, RestoreError
from dynamo_snapshot.agent.host import cgroups, inroot, pids, procfs
from dynamo_snapshot.agent.host.cgroups import Freezer
from dynamo_snapshot.agent.pipeline.guard import Guard
from dynamo_snapshot.agent.pipeline.target import Workload

log = structlog.get_logger(__name__)

_UNSAFE_MOUNT_CHARS = set("[]:,")

# Joins the cgroups given before "--" (so the restored tasks land in the placeholder's), then execs the rest.
_JOIN_CGROUPS = 'while [ "$1" != "--" ]; do echo 0 > "$1" || exit 97; shift; done; shift; exec "$@"'


def _external_mounts(info: ContainerInfo, root: int) -> dict[str, str]:
    external: dict[str, str] = {}
    for mount in procfs.mountinfo(root):
        if mount.mountpoint == "/":
            continue
        if _UNSAFE_MOUNT_CHARS & set(mount.mountpoint):
            raise CheckpointError(f"container {info.name}: cannot externalize mount {mount.mountpoint!r} for CRIU")
        if mount.mountpoint in external:
            raise CheckpointError(f"container {info.name}: {mount.mountpoint} is mounted more than once")
        external[mount.mountpoint] = mount.mountpoint
    return external


@dataclass(frozen=True)
class ContainerSource:
    """A checkpoint source container, read before touching it."""

    info: ContainerInfo
    workload: Workload
    freezer: Freezer
    upper_dir: Path
    net_ns: int
    pid_ns: int

    @property
    def init_pid(self) -> int:
        return self.info.pid

    async def arm(self, staging: Path, kept_log: Path) -> Guard:
        return await Guard.start(self.freezer, self.init_pid, staging, kept_log)

    def freeze(self) -> None:
        self.freezer.freeze()

    def thaw(self) -> None:
        self.freezer.thaw()

    def dump_options(self, settings: criu.CriuSettings, staging: Path, bundle: criu.CriuBundle) -> criu.DumpOptions:
        return criu.DumpOptions.configured(
            settings,
            pid=self.workload.root_pid,
            images_dir=staging,
            freeze_cgroup=self.freezer.path,
            net_ns_inode=self.net_ns,
            pid_ns_inode=self.pid_ns,
            external_mounts=self.workload.external_mounts,
        )

    def dump_argv(self, bundle: criu.CriuBundle, options: criu.DumpOptions) -> list[str]:
        # CRIU runs in the container's UTS and IPC namespaces (host mount, PID and network ones): what it
        # shares with the workload it does not record, so a restore leaves the workload in the
        # placeholder's UTS and IPC namespaces (its hostname is the restore pod's) instead of creating
        # new ones, which would need a writable /proc/sys the kubelet does not give containers.
        shared = ["nsenter", "--target", str(self.init_pid), "--uts", "--ipc", "--"]
        return [*shared, *bundle.command(), *options.argv()]

    async def capture_rootfs(self, staging: Path) -> tuple[list[str], list[str]]:
        return await anyio.to_thread.run_sync(
            rootfs.capture, self.upper_dir, set(self.workload.external_mounts),
            staging / layout.ROOTFS_DIFF, staging / layout.DELETED_FILES,
        )

    async def capture_dev_shm(self, staging: Path) -> None:
        if "/dev/shm" not in self.workload.external_mounts:
            return
        fd = os.open(staging / layout.DEV_SHM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            root = str(procfs.proc(self.workload.root_pid) / "root")
            await inroot.run(root, ["archive", "--source", "/dev/shm"], {"--archive-fd": fd})
        finally:
            os.close(fd)

    def kill_workload(self) -> None:
        self.freezer.kill_all_but(self.init_pid)

    def held_until_confirmed(self) -> bool:
        return True  # the guard's kill is complete only on a frozen cgroup (nothing forks meanwhile)

    def touched(self) -> bool:
        return self.freezer.frozen() or procfs.stopped_tasks(self.workload.host_tasks) != []

    async def tell_stored(self, checkpoint_id: str, artifact_version: str) -> bool:
        try:
            told = {"checkpointID": checkpoint_id, "artifactVersion": artifact_version}
            await control.signal_container(self.info, control.SNAPSHOT_COMPLETE, told)
        except (OSError, ValueError, inroot.InRootError) as exc:
            log.warning("checkpoint stored but the workload was not told", error=str(exc))
            return False
        return True


class ContainerTarget:
    """A running container, looked up through CRI once (by the caller, who hands ``info`` down, or at
    the resolve stage); every later stage acts on what that lookup found."""

    def __init__(self, cri: CRIClient, container_id: str, info: ContainerInfo | None = None):
        self.cri, self.container_id, self.info = cri, container_id, info
        self.describe = {"container_id": container_id}

    async def resolve(self) -> ContainerSource:
        info = self.info or await self.cri.container_info(self.container_id)
        if not info.running:
            raise CheckpointError(f"container {info.name} ({info.id}) is {info.state}, not running")
        kids = procfs.children(info.pid)
        if len(kids) != 1:
            raise CheckpointError(
                f"container {info.name} ({info.id}): its init (host PID {info.pid}) has {len(kids)} children; "
                "a checkpoint needs exactly one workload process below snapshot-init"
            )
        root = kids[0]
        try:
            reread = await control.read_reread_declaration(info)
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"container {info.name}: cannot read ready-for-snapshot: {exc}") from exc
        try:
            return self._source(info, root, reread)
        except (FileNotFoundError, ProcessLookupError) as exc:  # a task went while /proc was read
            raise CheckpointError(
                f"container {info.name} ({info.id}): its workload (host PID {root}) changed while it was being "
                f"looked at ({exc.strerror}: {exc.filename}): a process or thread exited before the "
                "checkpoint touched anything") from exc

    @staticmethod
    def _source(info: ContainerInfo, root: int, reread: Any) -> ContainerSource:
        """Everything /proc says of the workload below the container's init."""
        tasks = {procfs.ns_pid(tid, pid): tid for pid in procfs.process_tree(root) for tid in procfs.threads(pid)}
        workload = Workload(
            root_pid=root,
            tasks=tasks,
            stdio=procfs.stdio(root),
            identity={"containerName": info.name, "image": info.image},
            external_mounts=_external_mounts(info, root),
            reread=reread,
        )
        return ContainerSource(
            info=info,
            workload=workload,
            freezer=Freezer.of_process(root),
            upper_dir=rootfs.overlay_upper_dir(info.pid),  # the container init: its parent is the shim
            net_ns=procfs.namespace_inode(root, "net"),
            pid_ns=procfs.namespace_inode(root, "pid"),
        )


def _open_present(paths: dict[str, Path | None]) -> dict[str, int]:
    """Open for reading those of ``paths`` (option -> path) that exist."""
    return {option: os.open(path, os.O_RDONLY) for option, path in paths.items() if path is not None and path.exists()}


def _open_stdio(pid: int, recorded: list[str]) -> dict[str, int]:
    """Open the placeholder init's stdio for every pipe the workload's stdio was, so the restored
    workload writes into the placeholder's log (CRIU --inherit-fd)."""
    opened: dict[str, int] = {}
    for fd, target in enumerate(recorded[:3]):
        if not target.startswith("pipe:") or target in opened:
            continue
        flags = os.O_RDONLY if fd == 0 else os.O_WRONLY
        with contextlib.suppress(OSError):
            opened[target] = os.open(procfs.proc(pid) / "fd" / str(fd), flags)
    return opened


def _ref(fd: int) -> str:
    """How CRIU, inside the placeholder, reaches a descriptor the agent opened."""
    return f"/proc/self/fd/{fd}"


@dataclass
class Placeholder:
    """A restore placeholder in standby."""

    info: ContainerInfo
    mountpoints: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"placeholder {self.info.name}"

    @property
    def gpu_view_pid(self) -> int:
        return self.info.pid

    @property
    def prefetch_root(self) -> Path:
        return procfs.proc(self.info.pid) / "root"  # the files as the restored worker will see them

    def work_dir(self, restores: Path) -> Path:
        return restores / self.info.id

    def ready(self) -> None:
        info = self.info
        if not info.running:
            raise RestoreError(f"placeholder {info.name} ({info.id}) is {info.state}, not running")
        if not control.in_standby(info):
            raise RestoreError(
                f"placeholder {info.name} ({info.id}) is not in standby ({control.RESTORE_STANDBY_ENV}=1)"
            )
        if control.control_dir(info) is None:
            raise RestoreError(f"placeholder {info.name} ({info.id}) has no {control.CONTROL_DIR_ENV}")

    def check(self, manifest: dict[str, Any], images: Path) -> None:
        """Each mount the checkpoint had must exist in the placeholder, and no image thread may hold more
        privilege than the placeholder's init (``container.privilege``)."""
        privilege.check_images(images, self.info.pid)
        self.mountpoints = {m.mountpoint for m in procfs.mountinfo(self.info.pid)}
        wanted = set(manifest.get("criu", {}).get("externalMounts", {}))
        if missing := sorted(wanted - self.mountpoints):
            raise RestoreError(
                f"placeholder {self.info.name} ({self.info.id}) lacks mounts the checkpoint had: {', '.join(missing)}"
            )

    async def reserve_pids(self, wanted: Sequence[int]) -> None:
        await pids.reserve(self.info.pid, wanted)

    async def _extract(self, archive: Path, deleted: Path | None, skip: set[str], within: str) -> None:
        fds = _open_present({"--archive-fd": archive, "--deleted-fd": deleted})
        try:
            if not fds:
                return
            command = ["extract", "--within", within]
            for path in sorted(skip - {"/"}):
                command += ["--skip", path]
            await inroot.run(str(procfs.proc(self.info.pid) / "root"), command, fds)
        finally:
            for fd in fds.values():
                os.close(fd)

    async def restore_rootfs(self, images: Path) -> None:
        await self._extract(images / layout.ROOTFS_DIFF, images / layout.DELETED_FILES, self.mountpoints, "/")

    async def restore_dev_shm(self, images: Path) -> None:
        await self._extract(images / layout.DEV_SHM, None, set(), "/dev/shm")

    async def run_criu(self, bundle: criu.CriuBundle, images: Path, work_dir: Path, manifest: dict[str, Any],
                       settings: criu.CriuSettings, extra: list[str]) -> None:
        opened: list[int] = []

        def keep(fd: int) -> int:
            opened.append(fd)
            return fd

        try:
            directory = os.O_RDONLY | os.O_DIRECTORY
            bundle_fd = keep(os.open(bundle.path, directory))
            images_fd = keep(os.open(images, directory))
            work_fd = keep(os.open(work_dir, directory))
            ns = procfs.proc(self.info.pid) / "ns"
            pid_ns_fd = keep(os.open(ns / "pid", os.O_RDONLY))
            net_ns_fd = keep(os.open(ns / "net", os.O_RDONLY))
            join = {kind: keep(os.open(ns / kind, os.O_RDONLY)) for kind in ("uts", "ipc")}
            stdio = _open_stdio(self.info.pid, manifest.get("workload", {}).get("stdio", []))
            opened.extend(stdio.values())
            options = criu.RestoreOptions.configured(
                settings,
                images_dir=_ref(images_fd),
                work_dir=_ref(work_fd),
                pid_ns_fd=pid_ns_fd,
                net_ns_fd=net_ns_fd,
                external_mounts={key: mountpoint for mountpoint, key in manifest["criu"]["externalMounts"].items()},
                inherited_fds=stdio,
                join_namespaces={kind: _ref(fd) for kind, fd in join.items()},
            )
            argv = [*self._enter_argv(), *bundle.command(_ref(bundle_fd)), *options.argv(), *extra]
            await criu.run("restore", argv, work_dir / options.log_file, pass_fds=opened, env=options.env())
        finally:
            for fd in opened:
                os.close(fd)

    def _enter_argv(self) -> list[str]:
        """Join the placeholder's cgroups, then enter its mount/uts/ipc/net/pid namespaces."""
        pid = str(self.info.pid)
        cgroup_procs = [str(p) for p in cgroups.procs_files(self.info.pid)]
        nsenter = ["nsenter", "--target", pid, "--mount", "--uts", "--ipc", "--net", "--pid", "--"]
        return ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *cgroup_procs, "--", *nsenter]

    def host_pid(self, workload_pid: int) -> int | None:
        return procfs.tasks_in_pid_namespace(procfs.namespace_inode(self.info.pid, "pid")).get(workload_pid)

    def kill(self, restored_host_pid: int | None) -> None:
        """Kill the placeholder's init: the runtime restarts the container cleanly."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.info.pid, signal.SIGKILL)

    async def tell_restored(self, checkpoint_id: str, workload_pid: int) -> None:
        await control.signal_container(
            self.info, control.RESTORE_COMPLETE, {"checkpointID": checkpoint_id, "workloadPID": workload_pid}
        )


class PlaceholderTarget:
    """A restore placeholder, looked up once (``info`` handed down by the caller, or at the resolve stage)."""

    def __init__(self, cri: CRIClient, container_id: str, info: ContainerInfo | None = None):
        self.cri, self.container_id, self.info = cri, container_id, info
        self.describe = {"container_id": container_id}

    async def resolve(self) -> Placeholder:
        return Placeholder(self.info or await self.cri.container_info(self.container_id))
