"""A container's cgroups: freezing (v1 freezer or v2 cgroup.freeze), killing what is inside, joining.

The cgroup hierarchy's mount is configuration: ``/sys/fs/cgroup`` (where the DaemonSet mounts the
host's) unless the agent's start-up passes another to ``configure``. Nothing is read from the
environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from dynamo_snapshot.agent.errors import AgentError
from dynamo_snapshot.agent.host import procfs

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_ROOT = DEFAULT_CGROUP_ROOT
_POLL_S = 0.01


class CgroupError(AgentError):
    pass


def configure(root: Path | str) -> None:
    """Find the cgroup hierarchies below ``root`` from now on (the agent's start-up)."""
    global CGROUP_ROOT
    CGROUP_ROOT = Path(root)


def _v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _hierarchy_dir(controllers: str) -> Path:
    """Mount directory of a v1 hierarchy ('cpu,cpuacct' -> /sys/fs/cgroup/cpu,cpuacct; 'name=systemd' -> systemd)."""
    name = controllers.removeprefix("name=")
    candidate = CGROUP_ROOT / name
    if candidate.is_dir():
        return candidate
    for part in name.split(","):
        if (CGROUP_ROOT / part).is_dir():
            return CGROUP_ROOT / part
    raise CgroupError(f"cgroup hierarchy {controllers!r} is not mounted under {CGROUP_ROOT}")


def procs_files(pid: int) -> list[Path]:
    """The ``cgroup.procs`` file of every cgroup ``pid`` is in: writing a PID there moves it alongside.

    A v1 hierarchy that is mounted nowhere under the root and holds ``pid`` at its top (a named hierarchy
    some tool left on the host, which no runtime manages) has nothing to join and is passed over; one
    that holds it deeper is an error, as before."""
    paths = procfs.cgroup_paths(pid)
    if _v2():
        return [CGROUP_ROOT / paths[""].lstrip("/") / "cgroup.procs"]
    files = []
    for hierarchy, path in sorted(paths.items()):
        if not hierarchy:
            continue
        try:
            files.append(_hierarchy_dir(hierarchy) / path.lstrip("/") / "cgroup.procs")
        except CgroupError:
            if path != "/":
                raise
    return files


@dataclass(frozen=True)
class Freezer:
    """The freezer cgroup of a container (every process of the container, its init included)."""

    path: Path
    v2: bool

    @classmethod
    def of_process(cls, pid: int) -> Freezer:
        paths = procfs.cgroup_paths(pid)
        if _v2():
            return cls(CGROUP_ROOT / paths[""].lstrip("/"), v2=True)
        for hierarchy, path in paths.items():
            if "freezer" in hierarchy.split(","):
                return cls(_hierarchy_dir(hierarchy) / path.lstrip("/"), v2=False)
        raise CgroupError(f"process {pid} is in no freezer cgroup (is the freezer controller mounted?)")

    def frozen(self) -> bool:
        if self.v2:
            events = (self.path / "cgroup.events").read_text().split()
            return events[events.index("frozen") + 1] == "1"
        return (self.path / "freezer.state").read_text().strip() == "FROZEN"

    def _write(self, frozen: bool) -> None:
        if self.v2:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")
        else:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")

    def freeze(self, timeout_s: float = 30.0) -> None:
        """Freeze and wait until the kernel reports every task frozen (the state has no notification in v1)."""
        self._write(True)
        deadline = time.monotonic() + timeout_s
        while not self.frozen():
            if time.monotonic() > deadline:
                self._write(False)
                raise CgroupError(f"cgroup {self.path} did not freeze within {timeout_s} s")
            time.sleep(_POLL_S)

    def thaw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._write(False)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def kill_all_but(self, spare: int) -> list[int]:
        """SIGKILL every process in the cgroup except ``spare`` (the container's init). A frozen
        task dies once thawed, so callers thaw afterwards."""
        killed = []
        for pid in self.pids():
            if pid == spare:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return killed
