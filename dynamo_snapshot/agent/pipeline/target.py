"""What the checkpoint and restore pipelines need from the thing they work on: the only difference
between a container resolved through CRI (``containers.py``) and a plain host process tree
(``trees.py``).

A target is resolved once, at the first stage, into a ``Source`` (checkpoint) or a ``Destination``
(restore); the pipeline hands that object down to every later stage. What each side does per stage:

    checkpoint   container                           tree
    resolve      CRI lookup, the subtree below init  the tree (its root leads its session)
    guard        guard process (kill, thaw, unpromote) in-process: discard staging, unpromote
    freeze       cgroup freezer                       none (CRIU stops the tree itself)
    dump         nsenter the container's UTS+IPC,     host namespaces, plugins from the bundle
                 external net+PID namespaces
    rootfs       overlay upper dir, /dev/shm          none
    release      thaw, signal snapshot-complete       none; the tree runs on (its GPU state came
                                                      back during the manifest stage)

    restore      container                           tree
    resolve      placeholder in standby               nothing to look up
    verify       + mounts the checkpoint had          -
    pids         raise the PID counter, wait free     the PIDs must be free
    rootfs       extract diff, refill /dev/shm        none
    criu         placeholder's cgroups+namespaces     host namespaces
    on failure   kill the placeholder's init          kill the restored tree
    signal       restore-complete                     none

``manifest_fields`` is the one place the manifest's fields are put together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import control, criu


@dataclass(frozen=True)
class Workload:
    """What a checkpoint records about the workload, read at the resolve stage."""

    root_pid: int  # host PID of the subtree's root
    tasks: dict[int, int]  # PID as the workload sees it -> host TID, every thread of the subtree
    stdio: list[str]
    identity: dict[str, Any] = field(default_factory=dict)  # manifest workload fields naming the target
    external_mounts: dict[str, str] = field(default_factory=dict)  # mountpoint -> key
    reread: list[str] = field(default_factory=list)  # files the worker declared for a restore to prefetch

    @property
    def host_tasks(self) -> list[int]:
        return sorted(set(self.tasks.values()))

    def vpid_of(self, host: int) -> int | None:
        return {tid: vpid for vpid, tid in self.tasks.items()}.get(host)


class Guard(Protocol):
    """Undoes a failed checkpoint; told how far the pipeline got."""

    async def watch(self, pid: int) -> None: ...
    async def promoted(self, directory: Path) -> None: ...
    async def confirming(self) -> None: ...
    async def not_confirmed(self) -> None: ...
    async def disarm(self) -> None: ...
    async def trip(self) -> None: ...


class Source(Protocol):
    """A resolved checkpoint target."""

    workload: Workload

    async def arm(self, staging: Path, kept_log: Path) -> Guard: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def dump_options(self, settings: criu.CriuSettings, staging: Path, bundle: criu.CriuBundle) -> criu.DumpOptions:
        ...
    def dump_argv(self, bundle: criu.CriuBundle, options: criu.DumpOptions) -> list[str]: ...
    async def capture_rootfs(self, staging: Path) -> tuple[list[str], list[str]]: ...
    async def capture_dev_shm(self, staging: Path) -> None: ...
    def kill_workload(self) -> None: ...
    def held_until_confirmed(self) -> bool:
        """Whether the workload stays frozen until the confirmation (a container's cgroup). One that is not
        (a tree: CRIU leaves it running) gets its GPU state back while the manifest is written."""
        ...
    def touched(self) -> bool:
        """Whether a checkpoint has begun on the workload: frozen, or a task stopped or traced."""
        ...
    async def tell_stored(self, checkpoint_id: str, artifact_version: str) -> bool: ...


class CheckpointTarget(Protocol):
    describe: dict[str, Any]  # log keys

    async def resolve(self) -> Source: ...


class Destination(Protocol):
    """A resolved restore target."""

    name: str  # for messages: "placeholder main (<id>)", "the host"
    gpu_view_pid: int  # the process whose visible GPUs the restore may use
    prefetch_root: Path  # where the files to read ahead are seen from

    def work_dir(self, restores: Path) -> Path: ...
    def ready(self) -> None: ...  # raises if the target cannot take a restore (then it is killed)
    def check(self, manifest: dict[str, Any], images: Path) -> None: ...  # refuse verified images it cannot take
    async def reserve_pids(self, pids: Sequence[int]) -> None: ...
    async def restore_rootfs(self, images: Path) -> None: ...
    async def restore_dev_shm(self, images: Path) -> None: ...
    async def run_criu(self, bundle: criu.CriuBundle, images: Path, work_dir: Path, manifest: dict[str, Any],
                       settings: criu.CriuSettings, extra: list[str]) -> None: ...
    def host_pid(self, workload_pid: int) -> int | None: ...
    def kill(self, restored_host_pid: int | None) -> None: ...
    async def tell_restored(self, checkpoint_id: str, workload_pid: int) -> None: ...


class RestoreTarget(Protocol):
    describe: dict[str, Any]

    async def resolve(self) -> Destination: ...


def manifest_fields(
    checkpoint_id: str,
    artifact_version: str,
    created_at: str,
    compatibility: artifact.Compatibility,
    workload: Workload,
    rootfs_entries: list[str],
    deleted_paths: list[str],
    options: criu.DumpOptions,
    cuda_block: dict[str, Any],
    namespace: str = "",
) -> dict[str, Any]:
    """The manifest's fields (``write_manifest`` adds the file listing). Pure. ``namespace``: the source
    pod's (a host tree has none), so that only pods of that namespace restore it."""
    root = workload.vpid_of(workload.root_pid)
    return {
        "checkpointID": checkpoint_id,
        "artifactVersion": artifact_version,
        "createdAt": created_at,
        "compatibility": compatibility.to_json(),
        "workload": {
            **workload.identity,
            **({"namespace": namespace} if namespace else {}),
            "rootPID": workload.root_pid if root is None else root,
            "pids": sorted(workload.tasks),
            "stdio": workload.stdio,
            "rootfsEntries": rootfs_entries,
            "deletedPaths": deleted_paths,
            control.REREAD_FIELD: workload.reread,
        },
        "criu": {
            "externalMounts": workload.external_mounts,
            "dumpArgv": options.argv(),
            "networkLock": options.network_lock,
        },
        "cuda": cuda_block,
    }


def declared_files(manifest: dict[str, Any]) -> list[str]:
    """The absolute paths the worker declared for a restore to read ahead. Pure."""
    declared = manifest.get("workload", {}).get(control.REREAD_FIELD) or []
    return [p for p in declared if isinstance(p, str) and p.startswith("/")]
