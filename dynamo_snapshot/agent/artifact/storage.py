"""Where the agent reads and writes checkpoints for one container (SPEC section 6).

agentMount: the agent mounts the checkpoint PVC itself, at the base path.

podMount: only the workload pod mounts its namespace's PVC (at the base path, inside the pod), and
the agent reaches it through the container's root, ``/host/proc/<pid>/root/<basePath>``. The path is
the container's to shape, so it is resolved with ``openat2(RESOLVE_IN_ROOT)`` relative to that root:
absolute symlinks and ``..`` stay inside the container instead of reaching the host's files. The
directory is then held open and used through the agent's own ``/proc/<agent>/fd/<n>`` link, and the
container is asked for again: if its init PID changed (the container restarted while we resolved),
the attempt fails rather than write into the wrong container's storage. Below the base, the
checkpoint's own directories are checked with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` before use.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.container.runtime import ContainerInfo, CRIClient
from dynamo_snapshot.agent.errors import SnapshotError
from dynamo_snapshot.agent.host import confined, procfs


class StorageMode(enum.StrEnum):
    AGENT_MOUNT = "agentMount"
    POD_MOUNT = "podMount"


class StorageError(SnapshotError):
    pass


def open_in_root(root: Path, path: str) -> int:
    """Open directory ``path`` as if ``root`` were ``/``: no symlink or ``..`` leads out of it."""
    return confined.open_below(root, path, os.O_RDONLY | os.O_DIRECTORY)


def check_beneath(base_fd: int, relative: str) -> None:
    """Every existing directory on ``relative`` below the base is a real directory, not a symlink."""
    parts = [p for p in relative.split("/") if p]
    for depth in range(1, len(parts) + 1):
        sub = "/".join(parts[:depth])
        try:
            os.close(confined.openat2(base_fd, sub, confined.BENEATH_NO_LINKS))
        except FileNotFoundError:
            return  # the pipeline creates the rest
        except OSError as err:
            raise StorageError(f"checkpoint storage path {sub!r} is not a plain directory ({err.strerror})") from err


def _check_agent_mount(base: Path, checkpoint_id: str) -> None:
    try:
        base_fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise StorageError(f"checkpoint base path {base} is unusable in the agent: {err.strerror} "
                           "(is the checkpoint PVC mounted?)") from err
    try:
        check_beneath(base_fd, f"{checkpoint_id}/versions/tmp")
    finally:
        os.close(base_fd)


def _start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one that reused its PID."""
    stat = (procfs.proc(pid) / "stat").read_text()
    return stat.rpartition(")")[2].split()[19]


def _fd_path(fd: int) -> Path:
    """A path to an open directory that child processes (CRIU, the guard, helpers) can use too."""
    return procfs.proc(os.getpid()) / "fd" / str(fd)


@dataclass(frozen=True)
class StorageResolver:
    mode: StorageMode
    base_path: str  # agentMount: where the agent mounts the PVC; podMount: the default path inside pods
    cri: CRIClient

    @contextlib.asynccontextmanager
    async def open(self, info: ContainerInfo, checkpoint_id: str, pod_base_path: str | None = None
                   ) -> AsyncIterator[Path]:
        """The checkpoint base path for an operation on the container ``info`` (the caller's one lookup),
        valid inside the block. In podMount mode the container is looked up once more, after the
        storage is opened through its root: the one re-check that catches a container restarted in
        between."""
        if self.mode is StorageMode.AGENT_MOUNT:
            base = Path(self.base_path)
            _check_agent_mount(base, checkpoint_id)
            yield base
            return
        async with self._in_pod(info, checkpoint_id, pod_base_path or self.base_path) as base:
            yield base

    @contextlib.asynccontextmanager
    async def _in_pod(self, info: ContainerInfo, checkpoint_id: str, base_path: str) -> AsyncIterator[Path]:
        container_id = info.id
        if not info.running:
            raise StorageError(f"container {info.name} ({container_id}) is {info.state}: its storage is unreachable")
        started = _start_time(info.pid)
        root = procfs.proc(info.pid) / "root"
        try:
            base_fd = open_in_root(root, base_path)
        except OSError as err:
            raise StorageError(
                f"checkpoint storage {base_path} is not a directory in container {info.name} ({container_id}): "
                f"{err.strerror} (is the checkpoint PVC mounted in the pod?)"
            ) from err
        try:
            await self._recheck(info, started)
            check_beneath(base_fd, f"{checkpoint_id}/versions/tmp")
            yield _fd_path(base_fd)
        finally:
            os.close(base_fd)

    async def _recheck(self, info: ContainerInfo, started: str) -> None:
        again = await self.cri.container_info(info.id)
        try:
            same = again.running and again.pid == info.pid and _start_time(info.pid) == started
        except FileNotFoundError:  # /proc/<pid> is gone: the process exited
            same = False
        if not same:
            raise StorageError(
                f"container {info.name} ({info.id}) restarted or exited while its checkpoint storage was resolved"
            )
