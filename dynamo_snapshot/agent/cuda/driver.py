"""The CUDA driver checkpoint API, one process at a time.

Two backends behind one small interface (``CheckpointDriver``):

* ``BindingsDriver``: ``cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock,GetState,GetRestoreThreadId}``
  through cuda-bindings (the ``gpu`` extra), imported only when a driver is asked for, so the agent
  runs without it on nodes without GPUs;
* ``BinaryDriver``: NVIDIA's ``cuda-checkpoint`` utility, used when cuda-bindings is missing but the
  binary is installed.

Every call is blocking (the driver copies GPU memory inside it): callers run them in worker threads.
Errors name the PID and the driver's error, and say which of three things went wrong: the PID holds
no CUDA state (``NotACudaProcess``), the lock timed out (``CudaLockTimeout``), or this node cannot
checkpoint CUDA at all (``CudaUnavailable``).
"""

from __future__ import annotations

import ctypes
import enum
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from dynamo_snapshot.agent.errors import SnapshotError

CUDA_CHECKPOINT_ENV = "DYN_SNAPSHOT_CUDA_CHECKPOINT"  # path of the cuda-checkpoint binary
_BINARY_TIMEOUT_S = 600.0  # a checkpoint of a large GPU state takes seconds, not minutes


class CudaError(SnapshotError):
    """A CUDA checkpoint step failed; the message names the process and the driver's error."""


class CudaUnavailable(CudaError):
    """This node cannot checkpoint CUDA processes (no driver, a driver without the API, no binding)."""


class NotACudaProcess(CudaError):
    """The PID holds no CUDA state the driver knows of."""


class CudaLockTimeout(CudaError):
    """A process did not reach a point where it could be locked within the timeout (a kernel or a
    CUDA call kept running); it was left running."""


class ProcessState(enum.StrEnum):
    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"
    CHECKPOINTING = "checkpointing"
    RESTORING = "restoring"


GpuPair = tuple[str, str]  # (UUID the process was checkpointed on, UUID to restore onto), "GPU-..." form


class CheckpointDriver(Protocol):
    name: str

    def state(self, pid: int) -> ProcessState: ...

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int, gpu_pairs: Sequence[GpuPair] = ()) -> None: ...

    def unlock(self, pid: int) -> None: ...

    def restore_thread_id(self, pid: int) -> int: ...


def uuid_bytes(gpu_uuid: str) -> bytes:
    """``GPU-3f2a...`` (or ``MIG-...``) -> the 16 bytes the driver uses."""
    text = gpu_uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    try:
        return uuid.UUID(text).bytes
    except ValueError:
        raise ValueError(f"{gpu_uuid!r} is not a GPU UUID") from None


# ----------------------------------------------------------------------------------------------
# cuda-bindings


_STATE_BY_VALUE = {
    0: ProcessState.RUNNING,
    1: ProcessState.LOCKED,
    2: ProcessState.CHECKPOINTED,
    3: ProcessState.FAILED,
    4: ProcessState.CHECKPOINTING,
    5: ProcessState.RESTORING,
}
# Errors of GetState/Lock that mean "the driver knows no CUDA state for this PID".
_NO_CUDA_ERRORS = {"CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_FOUND", "CUDA_ERROR_NOT_INITIALIZED"}
_TIMEOUT_ERRORS = {"CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"}
_API = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessGetRestoreThreadId",
)


def _import_bindings() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        try:  # cuda-python before the cuda.bindings split
            from cuda import cuda as driver  # type: ignore[no-redef]
        except ImportError:
            raise CudaUnavailable("cuda-bindings is not installed (pip install 'dynamo-snapshot[gpu]')") from None
    return driver


def gpu_pair_structs(cu: Any, gpu_pairs: Sequence[GpuPair]) -> list[Any]:
    """``CUcheckpointGpuPair`` structs for the restore arguments. The binding's CUuuid is read-only,
    so both UUIDs are written into each pair's own memory."""
    structs = []
    for old, new in gpu_pairs:
        pair = cu.CUcheckpointGpuPair()
        raw = uuid_bytes(old) + uuid_bytes(new)
        ctypes.memmove(int(pair.getPtr()), raw, len(raw))
        if pair.oldUuid.bytes != raw[:16] or pair.newUuid.bytes != raw[16:]:
            raise CudaError(f"this cuda-bindings lays out CUcheckpointGpuPair differently; cannot map {old} -> {new}")
        structs.append(pair)
    return structs


class BindingsDriver:
    """The checkpoint API through cuda-bindings. ``cuInit`` runs once: the driver needs it (or
    persistence mode) before it restores a process."""

    name = "cuda-bindings"
    _init_lock = threading.Lock()

    def __init__(self, module: Any | None = None):
        self._cu = module if module is not None else _import_bindings()
        missing = [fn for fn in _API if not hasattr(self._cu, fn)]
        if missing:
            raise CudaUnavailable(f"this cuda-bindings has no CUDA checkpoint API (missing {', '.join(missing)})")
        with self._init_lock:
            try:
                (err,) = self._cu.cuInit(0)
            except Exception as exc:  # the binding raises when libcuda.so.1 cannot be loaded
                raise CudaUnavailable(f"the NVIDIA driver library cannot be loaded: {exc}") from exc
        if self._name(err) != "CUDA_SUCCESS":
            raise CudaUnavailable(f"cuInit failed: {self._name(err)}")
        try:
            err, version = self._cu.cuDriverGetVersion()
        except Exception as exc:
            raise CudaUnavailable(f"cuDriverGetVersion failed: {exc}") from exc
        # The process checkpoint API arrived with CUDA 12.8 (driver r570).
        if self._name(err) == "CUDA_SUCCESS" and int(version) < 12080:
            raise CudaUnavailable(
                f"the NVIDIA driver supports CUDA {int(version) // 1000}.{int(version) % 1000 // 10}; "
                "the process checkpoint API needs 12.8 (driver 570) or newer"
            )

    @staticmethod
    def _name(err: Any) -> str:
        return getattr(err, "name", str(err))

    def _call(self, fn: str, pid: int, *args: Any) -> tuple[str, tuple[Any, ...]]:
        try:
            result = getattr(self._cu, fn)(pid, *args)
        except RuntimeError as exc:  # the binding's "function not found in libcuda"
            raise CudaUnavailable(f"{fn} for PID {pid}: the driver has no such function ({exc})") from exc
        return self._name(result[0]), tuple(result[1:])

    def _check(self, fn: str, pid: int, err: str) -> None:
        if err == "CUDA_SUCCESS":
            return
        if err == "CUDA_ERROR_NOT_SUPPORTED":
            raise CudaUnavailable(f"{fn} for PID {pid}: {err} (this driver or GPU cannot checkpoint the process)")
        raise CudaError(f"{fn} for PID {pid} failed: {err}")

    def state(self, pid: int) -> ProcessState:
        err, (value,) = self._call("cuCheckpointProcessGetState", pid)
        if err in _NO_CUDA_ERRORS:
            raise NotACudaProcess(f"PID {pid} is not a CUDA process (cuCheckpointProcessGetState: {err})")
        self._check("cuCheckpointProcessGetState", pid, err)
        return _STATE_BY_VALUE.get(int(value), ProcessState.FAILED)

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = self._cu.CUcheckpointLockArgs()
        args.timeoutMs = int(timeout_ms)
        err, _ = self._call("cuCheckpointProcessLock", pid, args)
        if err in _TIMEOUT_ERRORS:
            raise CudaLockTimeout(f"PID {pid} could not be CUDA-locked within {timeout_ms} ms ({err}); left running")
        if err in _NO_CUDA_ERRORS:
            raise NotACudaProcess(f"PID {pid} is not a CUDA process (cuCheckpointProcessLock: {err})")
        self._check("cuCheckpointProcessLock", pid, err)

    def checkpoint(self, pid: int) -> None:
        err, _ = self._call("cuCheckpointProcessCheckpoint", pid, None)
        self._check("cuCheckpointProcessCheckpoint", pid, err)

    def restore(self, pid: int, gpu_pairs: Sequence[GpuPair] = ()) -> None:
        args = None
        if gpu_pairs:
            args = self._cu.CUcheckpointRestoreArgs()
            pairs = gpu_pair_structs(self._cu, gpu_pairs)
            args.gpuPairs = pairs
            args.gpuPairsCount = len(pairs)
        err, _ = self._call("cuCheckpointProcessRestore", pid, args)
        self._check("cuCheckpointProcessRestore", pid, err)

    def unlock(self, pid: int) -> None:
        err, _ = self._call("cuCheckpointProcessUnlock", pid, None)
        self._check("cuCheckpointProcessUnlock", pid, err)

    def restore_thread_id(self, pid: int) -> int:
        err, (tid,) = self._call("cuCheckpointProcessGetRestoreThreadId", pid)
        if err in _NO_CUDA_ERRORS:
            raise NotACudaProcess(f"PID {pid} is not a CUDA process (cuCheckpointProcessGetRestoreThreadId: {err})")
        self._check("cuCheckpointProcessGetRestoreThreadId", pid, err)
        return int(tid)


# ----------------------------------------------------------------------------------------------
# cuda-checkpoint


class BinaryDriver:
    """The same operations through NVIDIA's ``cuda-checkpoint`` utility (driver r570 or newer)."""

    name = "cuda-checkpoint"

    def __init__(self, binary: str):
        self.binary = binary

    @classmethod
    def locate(cls) -> BinaryDriver:
        path = os.environ.get(CUDA_CHECKPOINT_ENV) or shutil.which("cuda-checkpoint")
        if not path or not os.access(path, os.X_OK):
            raise CudaUnavailable(f"no cuda-checkpoint binary (not in PATH, {CUDA_CHECKPOINT_ENV} unset)")
        return cls(path)

    def _run(self, pid: int, *args: str) -> str:
        argv = [self.binary, *args, "--pid", str(pid)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=_BINARY_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CudaError(f"{' '.join(argv)} did not finish in {_BINARY_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
            lowered = message.lower()
            if "timeout" in lowered or "timed out" in lowered:
                raise CudaLockTimeout(f"PID {pid}: {' '.join(args)}: {message}; left running")
            if "not supported" in lowered:
                raise CudaUnavailable(f"PID {pid}: {' '.join(args)}: {message}")
            raise CudaError(f"PID {pid}: cuda-checkpoint {' '.join(args)} failed: {message}")
        return done.stdout.strip()

    def state(self, pid: int) -> ProcessState:
        try:
            out = self._run(pid, "--get-state")
        except CudaError as exc:
            if isinstance(exc, CudaUnavailable):
                raise
            raise NotACudaProcess(f"PID {pid} is not a CUDA process ({exc})") from exc
        try:
            return ProcessState(out.split()[-1].lower())
        except (IndexError, ValueError):
            raise CudaError(f"PID {pid}: cuda-checkpoint --get-state printed {out!r}") from None

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._run(pid, "--action", "lock", "--timeout", str(int(timeout_ms)))

    def checkpoint(self, pid: int) -> None:
        self._run(pid, "--action", "checkpoint")

    def restore(self, pid: int, gpu_pairs: Sequence[GpuPair] = ()) -> None:
        args = ["--action", "restore"]
        if gpu_pairs:
            args += ["--device-map", ",".join(f"{old}={new}" for old, new in gpu_pairs)]
        self._run(pid, *args)

    def unlock(self, pid: int) -> None:
        self._run(pid, "--action", "unlock")

    def restore_thread_id(self, pid: int) -> int:
        out = self._run(pid, "--get-restore-tid")
        try:
            return int(out.split()[-1])
        except (IndexError, ValueError):
            raise CudaError(f"PID {pid}: cuda-checkpoint --get-restore-tid printed {out!r}") from None


def load_driver() -> CheckpointDriver:
    """cuda-bindings when it works here, else the cuda-checkpoint binary; ``CudaUnavailable`` naming
    both reasons when neither does."""
    try:
        return BindingsDriver()
    except CudaUnavailable as bindings_error:
        try:
            return BinaryDriver.locate()
        except CudaUnavailable as binary_error:
            raise CudaUnavailable(
                f"no CUDA checkpoint API on this node: {bindings_error}; {binary_error}"
            ) from bindings_error
