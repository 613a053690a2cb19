"""The host process tree targets: no container runtime, the host's namespaces. The tree's root must
lead its session (start it with ``setsid``), and a restore needs the original gone: the restored
tasks get their old PIDs back.

    TreeTarget.resolve          the tree rooted at a PID: every thread of every process, its stdio
    TreeDestination             the checkpoint's PIDs must be free; CRIU restores detached, in the
                                host's namespaces, with the network lock the dump used
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from dynamo_snapshot.agent.artifact import layout
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.errors import CheckpointError, RestoreError
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.pipeline.target import Workload


def plugins_dir(bundle: criu.CriuBundle) -> str | None:
    plugins = bundle.path / "plugins"
    return str(plugins) if plugins.is_dir() else None


def kill_tree(pid: int) -> None:
    for member in reversed(procfs.process_tree(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


class StagingGuard:
    """A tree's guard, in-process: CRIU resumes the tree on failure, so only the artifact is undone."""

    def __init__(self, staging: Path, kept_log: Path):
        self.staging, self.kept_log = staging, kept_log
        self.final: Path | None = None
        self._promoted: Path | None = None

    async def watch(self, pid: int) -> None:
        return None

    async def promoted(self, directory: Path) -> None:
        self.final = directory

    async def confirming(self) -> None:
        self._promoted, self.final = self.final, None

    async def not_confirmed(self) -> None:
        self.final = self._promoted

    async def disarm(self) -> None:
        return None

    async def trip(self) -> None:
        if self.final is not None:
            await anyio.to_thread.run_sync(layout.withdraw, self.final)
        await anyio.to_thread.run_sync(layout.discard_staging, self.staging, self.kept_log)


@dataclass(frozen=True)
class TreeSource:
    workload: Workload

    async def arm(self, staging: Path, kept_log: Path) -> StagingGuard:
        return StagingGuard(staging, kept_log)

    def freeze(self) -> None:
        return None

    def thaw(self) -> None:
        return None

    def dump_options(self, settings: criu.CriuSettings, staging: Path, bundle: criu.CriuBundle) -> criu.DumpOptions:
        return criu.DumpOptions.configured(
            settings,
            pid=self.workload.root_pid,
            images_dir=staging,
            freeze_cgroup=None,
            net_ns_inode=None,
            pid_ns_inode=None,
            external_mounts={},
            libdir=plugins_dir(bundle),
        )

    def dump_argv(self, bundle: criu.CriuBundle, options: criu.DumpOptions) -> list[str]:
        return [*bundle.command(), *options.argv()]

    async def capture_rootfs(self, staging: Path) -> tuple[list[str], list[str]]:
        return [], []

    async def capture_dev_shm(self, staging: Path) -> None:
        return None

    def kill_workload(self) -> None:
        kill_tree(self.workload.root_pid)

    def held_until_confirmed(self) -> bool:
        return False  # CRIU leaves the tree running; a failure only undoes the artifact and the CUDA lock

    def touched(self) -> bool:
        return procfs.stopped_tasks(self.workload.host_tasks) != []

    async def tell_stored(self, checkpoint_id: str, artifact_version: str) -> bool:
        return False  # a plain tree has no control directory


class TreeTarget:
    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.describe = {"root_pid": root_pid}

    async def resolve(self) -> TreeSource:
        root = self.root_pid
        if os.getsid(root) != root:
            raise CheckpointError(
                f"{cuda_devices.describe_process(root)} does not lead its session; CRIU dumps a tree whose "
                "root does (start it with setsid)"
            )
        # In the host's namespace a thread's TID is what the restore sees.
        tasks = {tid: tid for pid in procfs.process_tree(root) for tid in procfs.threads(pid)}
        workload = Workload(root_pid=root, tasks=tasks, stdio=procfs.stdio(root), identity={"processTree": True})
        return TreeSource(workload)


class TreeDestination:
    name = "the host"

    @property
    def gpu_view_pid(self) -> int:
        return os.getpid()  # the tree is restored as this process's descendant, seeing its GPUs
    prefetch_root = Path("/")

    def work_dir(self, restores: Path) -> Path:
        attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # CRIU refuses an existing pidfile
        return restores / attempt

    def ready(self) -> None:
        return None

    def check(self, manifest: dict[str, Any], images: Path) -> None:
        return None  # a host tree is restored by root, as it was: no placeholder to bound it

    async def reserve_pids(self, wanted: Sequence[int]) -> None:
        busy = [pid for pid in wanted if procfs.proc(pid).exists()]
        if busy:
            who = "; ".join(cuda_devices.describe_process(p) for p in busy[:3])
            raise RestoreError(
                f"{len(busy)} of the checkpoint's PIDs are in use ({who}); a process tree restores with its own "
                "PIDs, so the original must be gone"
            )

    async def restore_rootfs(self, images: Path) -> None:
        return None

    async def restore_dev_shm(self, images: Path) -> None:
        return None

    async def run_criu(self, bundle: criu.CriuBundle, images: Path, work_dir: Path, manifest: dict[str, Any],
                       settings: criu.CriuSettings, extra: list[str]) -> None:
        options = criu.RestoreOptions.on_host(settings, str(images), str(work_dir), plugins_dir(bundle))
        lock = manifest.get("criu", {}).get("networkLock", settings.network_lock)
        argv = [*bundle.command(), *options.argv(), *(["--network-lock", lock] if lock else []), *extra]
        await criu.run("restore", argv, work_dir / options.log_file, env=options.env())

    def host_pid(self, workload_pid: int) -> int | None:
        return workload_pid

    def kill(self, restored_host_pid: int | None) -> None:
        if restored_host_pid is not None:
            kill_tree(restored_host_pid)

    async def tell_restored(self, checkpoint_id: str, workload_pid: int) -> None:
        return None


class TreeRestoreTarget:
    describe: dict[str, Any] = {"target": "process tree"}

    async def resolve(self) -> TreeDestination:
        return TreeDestination()
