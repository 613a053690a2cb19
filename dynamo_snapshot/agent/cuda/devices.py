"""What the host's /proc says about NVIDIA GPUs and the processes using them (no driver library).

* ``nvidia_usage(pid)``: the NVIDIA device files a process has mapped (``/proc/<pid>/maps``) or open
  (``/proc/<pid>/fd``). CRIU cannot dump either, so every such process must be a CUDA process whose
  GPU state the driver checkpoints (which releases them) - or it must be gone before the dump.
* ``gpus()``, ``driver_version()``: the node's GPUs (UUID, model, minor number) and driver release from
  ``/proc/driver/nvidia``, for the manifest's compatibility record and GPU remapping on restore.
* ``visible_gpus(pid)``: the GPUs whose device nodes exist in a process's root (a container sees
  only its own), i.e. where a restored process can be put back.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from dynamo_snapshot.agent.errors import AgentError
from dynamo_snapshot.agent.host import procfs

log = structlog.get_logger(__name__)

NVIDIA_MAJOR = 195  # /dev/nvidia<minor> GPUs and /dev/nvidiactl (255); nvidia-uvm has a dynamic major
_GPU_NODE = re.compile(r"^/dev/nvidia(\d+)$")
_DEVICE_PREFIX = "/dev/nvidia"
_DRIVER_VERSION = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class NvidiaUsage:
    """NVIDIA device files one process holds: mapped into its memory, or open as descriptors."""

    pid: int
    mapped: tuple[str, ...] = ()
    open_files: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return bool(self.mapped or self.open_files)

    @property
    def gpu_minors(self) -> tuple[int, ...]:
        """Minor numbers of the GPUs (``/dev/nvidia<N>``) among the held files."""
        minors = {int(m.group(1)) for path in (*self.mapped, *self.open_files) if (m := _GPU_NODE.match(path))}
        return tuple(sorted(minors))

    def describe(self) -> str:
        parts = []
        if self.mapped:
            parts.append("maps " + ", ".join(self.mapped))
        if self.open_files:
            parts.append("has open " + ", ".join(self.open_files))
        return "; ".join(parts) or "holds no NVIDIA device"


def parse_maps_devices(maps_text: str) -> tuple[str, ...]:
    """NVIDIA device paths among the mappings of a ``/proc/<pid>/maps`` text (sorted, unique)."""
    found: set[str] = set()
    for line in maps_text.splitlines():
        # address perms offset dev inode pathname - the pathname may contain spaces
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            path = fields[5].strip()
            if path.endswith(" (deleted)"):
                path = path[: -len(" (deleted)")]
            if path.startswith(_DEVICE_PREFIX):
                found.add(path)
    return tuple(sorted(found))


def nvidia_usage(pid: int) -> NvidiaUsage:
    """Which NVIDIA device files ``pid`` maps or has open; empty if it exited meanwhile."""
    try:
        mapped = parse_maps_devices((procfs.proc(pid) / "maps").read_text(errors="replace"))
    except (FileNotFoundError, ProcessLookupError):
        mapped = ()
    opened: set[str] = set()
    try:
        for fd in (procfs.proc(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(_DEVICE_PREFIX):
                opened.add(target)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return NvidiaUsage(pid, mapped, tuple(sorted(opened)))


def thread_group_leaders(tids: list[int] | tuple[int, ...]) -> list[int]:
    """The processes (thread group leaders) among host TIDs; threads share their leader's memory."""
    leaders = set()
    for tid in tids:
        try:
            leaders.add(int(procfs.status_field(tid, "Tgid")))
        except (OSError, KeyError, ValueError):
            continue
    return sorted(leaders)


def describe_process(pid: int) -> str:
    """``PID 123 (python3: python -m torch._inductor.compile_worker ...)`` for error messages."""
    try:
        cmdline = (procfs.proc(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    if len(cmdline) > 160:
        cmdline = cmdline[:157] + "..."
    name = procfs.comm(pid)
    return f"PID {pid} ({name}: {cmdline})" if cmdline else f"PID {pid} ({name})"


@dataclass(frozen=True)
class Gpu:
    uuid: str  # "GPU-..."
    model: str  # "NVIDIA H200"
    minor: int  # /dev/nvidia<minor>
    bus: str = ""

    def to_json(self) -> dict[str, object]:
        return {"uuid": self.uuid, "model": self.model, "minor": self.minor, "bus": self.bus}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Gpu:
        return cls(str(data["uuid"]), str(data.get("model", "")), int(data.get("minor", -1)), str(data.get("bus", "")))


def _driver_root() -> Path:
    return procfs.PROC / "driver" / "nvidia"  # driver entries are the same in every procfs mount


def parse_gpu_information(text: str) -> dict[str, str]:
    """``/proc/driver/nvidia/gpus/<bus>/information``: ``Key:  value`` lines."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def gpus(root: Path | None = None) -> list[Gpu]:
    """This node's GPUs, by minor number; empty without the NVIDIA driver."""
    base = (root or _driver_root()) / "gpus"
    found = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            info = parse_gpu_information((entry / "information").read_text())
        except OSError:
            continue
        uuid_text, minor = info.get("GPU UUID", ""), info.get("Device Minor", "")
        if not uuid_text or not minor.isdigit():
            continue
        found.append(Gpu(uuid=uuid_text, model=info.get("Model", ""), minor=int(minor), bus=entry.name))
    return sorted(found, key=lambda g: g.minor)


def compute_gpus(pids: Iterable[int]) -> dict[int, tuple[str, ...]]:
    """UUIDs of the GPUs on which each of ``pids`` has a CUDA context, as NVML reports them (what
    ``nvidia-smi`` lists); {} where NVML cannot be asked (no ``nvidia-ml-py`` or no libnvidia-ml).

    The device files a process holds overstate this: a CUDA process opens those of every GPU it can
    see, whichever it computes on (seen on a two-GPU machine: a worker on GPU 0 held /dev/nvidia0 and
    /dev/nvidia1). A checkpoint records what the process really used, or a restore would ask for more
    GPUs than it needs."""
    wanted = set(pids)
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    found: dict[int, list[str]] = {}
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in wanted and uuid not in found.setdefault(process.pid, []):
                    found[process.pid].append(uuid)
    except pynvml.NVMLError as exc:
        log.warning("NVML could not list the GPUs' processes; going by device files", error=str(exc))
        return {}
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return {pid: tuple(sorted(uuids)) for pid, uuids in found.items()}


def driver_version(root: Path | None = None) -> str | None:
    """The NVIDIA kernel driver release (``580.159.04``), or None without the driver."""
    try:
        text = ((root or _driver_root()) / "version").read_text()
    except OSError:
        return None
    match = _DRIVER_VERSION.search(text)
    return match.group(1) if match else None


def visible_gpus(pid: int, node_gpus: list[Gpu]) -> list[Gpu]:
    """The node's GPUs whose device node exists in ``pid``'s root filesystem (its container's /dev)."""
    by_minor = {g.minor: g for g in node_gpus}
    dev = procfs.proc(pid) / "root" / "dev"
    visible = []
    try:
        names = os.listdir(dev)
    except OSError:
        return []
    for name in names:
        if not _GPU_NODE.match(f"/dev/{name}"):
            continue
        try:
            st = os.stat(dev / name)
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == NVIDIA_MAJOR:
            gpu = by_minor.get(os.minor(st.st_rdev))
            if gpu is not None:
                visible.append(gpu)
    return sorted(set(visible), key=lambda g: g.minor)


class GpuMismatch(AgentError, ValueError):
    """The target cannot hold the GPUs the checkpoint was taken on."""


def plan_gpu_pairs(
    recorded: list[Gpu], target: list[Gpu], used: set[str] | None = None, visible: list[Gpu] | None = None
) -> list[tuple[str, str]]:
    """How to put a checkpoint's GPUs onto this node's: [] when nothing moves, else one (old UUID,
    new UUID) pair for **every** recorded GPU (the driver wants all it checkpointed, which is every GPU
    the processes could see, computing on it or not).

    ``used`` (default: all recorded) are the GPUs the processes computed on: each goes to a GPU of
    ``target`` of the same model (staying where it is if that is in ``target``). The others only need a
    distinct GPU of the same model among ``visible`` (default: ``target``), the GPUs the restored
    processes can open. Raises ``GpuMismatch`` naming what is missing."""
    used = {g.uuid for g in recorded} if used is None else used
    visible = target if visible is None else visible
    target_uuids, visible_uuids = {g.uuid for g in target}, {g.uuid for g in visible}
    computing = [g for g in recorded if g.uuid in used]
    idle = [g for g in recorded if g.uuid not in used]
    if all(g.uuid in target_uuids for g in computing) and all(g.uuid in visible_uuids for g in idle):
        return []
    taken: set[str] = set()
    pairs: dict[str, str] = {}
    missing: list[Gpu] = []

    def place(gpu: Gpu, pool: list[Gpu]) -> None:
        choice = next((g for g in pool if g.uuid == gpu.uuid and g.uuid not in taken), None)
        choice = choice or next((g for g in pool if g.model == gpu.model and g.uuid not in taken), None)
        if choice is None:
            missing.append(gpu)
            return
        taken.add(choice.uuid)
        pairs[gpu.uuid] = choice.uuid

    for gpu in computing:  # kept first where they are, so a moved GPU never takes a kept one's place
        if gpu.uuid in target_uuids:
            place(gpu, target)
    for gpu in computing:
        if gpu.uuid not in pairs:
            place(gpu, target)
    for gpu in idle:
        place(gpu, visible)
    if missing:
        wanted = ", ".join(f"{g.model} ({g.uuid})" for g in missing)
        have = ", ".join(f"{g.model} ({g.uuid})" for g in target) or "no GPUs"
        raise GpuMismatch(
            f"the checkpoint ran on {wanted}, which the target cannot provide: it has {have} "
            "(a restore needs a GPU of the same model for each)"
        )
    return [(g.uuid, pairs[g.uuid]) for g in recorded]


def recorded_gpus(entries: Any) -> tuple[list[str], list[str]]:
    """UUIDs and models of a manifest's `gpus` list: `{"uuid", "model"}` entries, or plain UUID strings as
    older manifests wrote them (model unknown)."""
    uuids, models = [], []
    for entry in entries or ():
        if isinstance(entry, Mapping):
            uuids.append(str(entry.get("uuid", "")))
            models.append(str(entry.get("model", "")))
        else:
            uuids.append(str(entry))
            models.append("")
    return uuids, models
