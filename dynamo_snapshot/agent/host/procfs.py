"""Reading processes, namespaces and mounts from the host's /proc (the agent runs with hostPID).

Which /proc is read is configuration: ``/proc`` unless the agent's ``--host-proc`` names another
(``/host/proc`` in the DaemonSet), set once at start-up with ``configure`` (a test uses ``configured``).
Nothing is read from the environment.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROC = Path("/proc")
PROC = DEFAULT_PROC


def configure(proc_root: Path | str) -> None:
    """Read processes from ``proc_root`` from now on (the agent's start-up)."""
    global PROC
    PROC = Path(proc_root)


@contextlib.contextmanager
def configured(proc_root: Path | str) -> Iterator[Path]:
    """Read processes from ``proc_root`` within the block, then from the /proc used before."""
    before = PROC
    configure(proc_root)
    try:
        yield PROC
    finally:
        configure(before)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def proc(pid: int | str) -> Path:
    return PROC / str(pid)


def host_path(path: str, container_pid: int) -> Path:
    """A path of the runtime's mount namespace (an overlay upperdir, say) as the agent reaches it: as is
    when the agent shares that namespace, else (the DaemonSet, /proc at /host/proc) through the root of
    the process that started the container ``container_pid`` - its shim (containerd) or conmon (CRI-O),
    which live where the runtime does. Not through PID 1: an init may refuse /proc/1/root to everyone
    (it does on Firecracker VMs), and in a nested node (kind) PID 1 is not the runtime's."""
    if PROC == DEFAULT_PROC:
        return Path(path)
    parent = status_field(container_pid, "PPid")
    return PROC / parent / "root" / path.lstrip("/")


def children(pid: int) -> list[int]:
    """Direct children of every thread of ``pid`` (needs CONFIG_PROC_CHILDREN, part of checkpoint/restore)."""
    found: list[int] = []
    for task in (proc(pid) / "task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(set(found))


def threads(pid: int) -> list[int]:
    return sorted(int(t.name) for t in (proc(pid) / "task").iterdir())


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (host PIDs, thread group leaders)."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            todo.extend(children(pid))
    return sorted(tree)


def status_field(pid: int | str, field: str) -> str:
    for line in (proc(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise KeyError(f"/proc/{pid}/status has no {field}")


def stopped_tasks(tids: list[int]) -> list[int]:
    """The tasks among ``tids`` that are stopped or traced (a CRIU dump seizes them); gone ones are skipped."""
    found = []
    for tid in tids:
        try:
            if status_field(tid, "State")[:1] in ("t", "T"):
                found.append(tid)
        except (OSError, KeyError):
            continue
    return found


def ns_pid(task: int | str, parent: int | str | None = None) -> int:
    """The PID of a task in its innermost PID namespace (the last NSpid entry)."""
    path = f"{parent}/task/{task}" if parent is not None else task
    return int(status_field(path, "NSpid").split()[-1])


def namespace_inode(pid: int, ns: str) -> int:
    """Inode of ``/proc/<pid>/ns/<ns>`` (how CRIU names external namespaces)."""
    return os.stat(proc(pid) / "ns" / ns).st_ino


def comm(pid: int) -> str:
    try:
        return (proc(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def fd_target(pid: int, fd: int) -> str:
    return os.readlink(proc(pid) / "fd" / str(fd))


def stdio(pid: int) -> list[str]:
    """What a process's fds 0, 1 and 2 point at ("" for a closed one)."""
    out = []
    for fd in (0, 1, 2):
        try:
            out.append(fd_target(pid, fd))
        except FileNotFoundError:
            out.append("")
    return out


def tasks_in_pid_namespace(pidns_inode: int) -> dict[int, int]:
    """Every task (threads included) of a PID namespace: {PID in that namespace: host TID}."""
    found: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "pid").st_ino != pidns_inode:
                continue
            for task in (entry / "task").iterdir():
                found[ns_pid(task.name, entry.name)] = int(task.name)
        except (OSError, KeyError, ValueError):
            continue  # exited while we looked, or not ours to inspect
    return found


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    root: str  # the mount's root within its filesystem
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str

    def super_option(self, name: str) -> str | None:
        for opt in self.super_options.split(","):
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mountinfo(pid: int) -> list[Mount]:
    mounts = []
    for line in (proc(pid) / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=fields[5],
                fstype=tail[0],
                source=_unescape(tail[1]),
                super_options=tail[2] if len(tail) > 2 else "",
            )
        )
    return mounts


def cgroup_paths(pid: int) -> dict[str, str]:
    """{hierarchy: path} from /proc/<pid>/cgroup; the cgroup v2 hierarchy is keyed ''."""
    paths = {}
    for line in (proc(pid) / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths[controllers] = path
    return paths
