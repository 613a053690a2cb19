"""The CUDA step of checkpoint and restore, behind one interface.

Checkpoint: ``prepare`` finds the CUDA processes of the workload and locks them (with a timeout),
``checkpoint`` moves their GPU state into host memory and returns what the manifest must record
(driver version, GPUs); then CRIU dumps; ``release`` gives the source its GPU state back once the
dump is stored (so it can exit cleanly or keep serving: a locked process would hang in its first CUDA
call, its exit handlers included). Restore: ``check_restore`` refuses, before anything is touched,
a target whose GPUs cannot hold the checkpoint's; after CRIU, ``restore`` brings the GPU state back
(remapping GPUs when the target's differ) and unlocks. ``abort`` undoes what was done after a
failure.

``NoCuda`` is the step on nodes and workloads without CUDA: it does nothing, but refuses a workload
that does use a GPU, since dumping it without the CUDA step would produce a broken checkpoint.
``DriverCuda`` (``cuda/driverstep.py``) is the step through the CUDA driver checkpoint API; ``default_step``
picks one for the node.

The order ``DriverCuda`` keeps (refuse helpers, lock all, checkpoint all, roll back on failure) is
in ``cuda/driverstep.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import structlog

from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.driverstep import DEFAULT_LOCK_TIMEOUT_S, DriverCuda
from dynamo_snapshot.agent.cuda.state import CudaState
from dynamo_snapshot.agent.errors import SnapshotError
from dynamo_snapshot.agent.host import procfs

log = structlog.get_logger(__name__)



class CudaStep(Protocol):
    async def node_state(self) -> CudaState:
        """This node's driver version and GPUs, for the compatibility check of a restore."""
        ...

    async def prepare(self, pids: Sequence[int]) -> None: ...

    async def checkpoint(self) -> CudaState: ...

    async def release(self) -> None: ...

    async def resume(self, pids: Sequence[int]) -> list[int]:
        """Bring back the CUDA processes among ``pids`` that an earlier (dead) agent left locked or
        checkpointed, by the driver's state of each; the PIDs brought back."""
        ...

    async def check_restore(self, recorded: CudaState, target_pid: int) -> None: ...

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

    async def release(self) -> None:
        return None

    async def resume(self, pids: Sequence[int]) -> list[int]:
        return []

    async def check_restore(self, recorded: CudaState, target_pid: int) -> None:
        if recorded.processes:
            raise SnapshotError("the checkpoint holds CUDA state but this agent has no CUDA restore step configured")

    async def restore(self, pids: Sequence[int], recorded: CudaState) -> None:
        if recorded.processes:
            raise SnapshotError("the checkpoint holds CUDA state but this agent has no CUDA restore step configured")

    async def abort(self) -> None:
        return None


def default_step(lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> CudaStep:
    """``DriverCuda`` on a node with NVIDIA GPUs, ``NoCuda`` elsewhere; the driver itself is loaded
    on first use, so a node without cuda-bindings fails only when a workload actually uses a GPU."""
    if cuda_devices.driver_version() is None:
        return NoCuda()
    return DriverCuda(lock_timeout_s=lock_timeout_s)
