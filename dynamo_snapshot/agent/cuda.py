"""The CUDA step of checkpoint and restore, behind one interface.

Checkpoint: ``prepare`` finds the CUDA processes of the workload and locks them (with a timeout),
``checkpoint`` moves their GPU state into host memory and returns what the manifest must record
(driver version, GPUs); then CRIU dumps. Restore: after CRIU, ``restore`` brings the GPU state back
(remapping GPUs when the node's differ) and unlocks. ``abort`` undoes a lock after a failure, before
the agent kills the workload.

``NoCuda`` is the step on nodes and workloads without CUDA: it does nothing, but refuses a workload
that does use a GPU, since dumping it without the CUDA step would produce a broken checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_snapshot.agent import procfs
from dynamo_snapshot.agent.errors import SnapshotError


@dataclass(frozen=True)
class CudaState:
    """What a checkpoint's CUDA step recorded; goes into the manifest's compatibility block."""

    driver_version: str | None = None
    gpus: tuple[str, ...] = ()
    processes: tuple[int, ...] = field(default=())  # host PIDs that held CUDA state


class CudaStep(Protocol):
    async def node_state(self) -> CudaState:
        """This node's driver version and GPUs, for the compatibility check of a restore."""
        ...

    async def prepare(self, pids: Sequence[int]) -> None: ...

    async def checkpoint(self) -> CudaState: ...

    async def restore(self, pids: Sequence[int], recorded: CudaState) -> None: ...

    async def abort(self) -> None: ...


def uses_gpu(pid: int) -> bool:
    """True when the process has an NVIDIA device open."""
    try:
        for fd in (procfs.proc(pid) / "fd").iterdir():
            try:
                if os.readlink(fd).startswith("/dev/nvidia"):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


class NoCuda:
    async def node_state(self) -> CudaState:
        return CudaState()

    async def prepare(self, pids: Sequence[int]) -> None:
        gpu = [pid for pid in pids if uses_gpu(pid)]
        if gpu:
            raise SnapshotError(
                f"processes {gpu} have NVIDIA devices open but this agent has no CUDA checkpoint step configured"
            )

    async def checkpoint(self) -> CudaState:
        return CudaState()

    async def restore(self, pids: Sequence[int], recorded: CudaState) -> None:
        if recorded.processes:
            raise SnapshotError("the checkpoint holds CUDA state but this agent has no CUDA restore step configured")

    async def abort(self) -> None:
        return None
