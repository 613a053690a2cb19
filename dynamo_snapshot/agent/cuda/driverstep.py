"""``DriverCuda``: the CUDA step (``cuda/step.py``'s interface) through the CUDA driver checkpoint API
(``cuda/driver.py``: cuda-bindings, or the cuda-checkpoint binary). One instance serves one checkpoint
(``prepare`` .. ``release``/``abort``) or one restore.

Stages, in order (each guarantees the next never starts on a half-done workload):

    refuse     every process of the tree that maps or opens an NVIDIA device must be a CUDA process the
               driver knows; one that is not (a forked helper, e.g. torch.compile's compile workers) cannot
               be CUDA-checkpointed and CRIU cannot dump its device mappings, so it is refused **before
               anything is locked** (``CudaHelperProcesses``, naming each)
    lock       every CUDA process, each with the timeout
    checkpoint every locked process's GPU state into host memory; what the manifest records (driver
               release, GPUs, which process saw which) is returned
    release    after the dump is stored: the source gets its GPU state back and is unlocked
    restore    after CRIU: the GPU state back onto the target's GPUs (remapped where they differ), unlocked
    rollback   a failure in lock or checkpoint restores and unlocks what was checkpointed and unlocks what
               was locked, and re-raises
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import structlog

from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.devices import Gpu, GpuMismatch, NvidiaUsage
from dynamo_snapshot.agent.cuda.driver import (
    CheckpointDriver,
    CudaError,
    GpuPair,
    NotACudaProcess,
    ProcessState,
    load_driver,
)
from dynamo_snapshot.agent.cuda.state import CudaState
from dynamo_snapshot.agent.host import procfs

log = structlog.get_logger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 10.0
NVML_TIMEOUT_S = 10.0
T = TypeVar("T")


class CudaHelperProcesses(CudaError):
    """Processes of the workload hold NVIDIA device mappings without being CUDA processes."""

    def __init__(self, helpers: Sequence[tuple[NvidiaUsage, str]]):
        self.pids = [usage.pid for usage, _ in helpers]
        lines = [
            f"{cuda_devices.describe_process(usage.pid)} {usage.describe()} but is not a CUDA process ({why})"
            for usage, why in helpers
        ]
        super().__init__(
            "cannot checkpoint: "
            + "; ".join(lines)
            + ". The driver cannot checkpoint such a process and CRIU cannot dump its device mappings; nothing "
            "was locked. Shut helper processes down before signalling ready-for-snapshot "
            "(dynamo_snapshot.workload.stop_gpu_helpers(); for torch.compile, or TORCHINDUCTOR_COMPILE_THREADS=1)"
        )


@dataclass
class _Tracked:
    pid: int
    gpus: tuple[str, ...]  # every GPU it can see (whose device files it holds)
    computing: tuple[str, ...] | None = None  # the GPUs it has memory on, where NVML said
    locked: bool = False
    checkpointed: bool = False


async def _each(items: Sequence[T], fn: Callable[[T], Awaitable[None]], parallel: bool) -> list[BaseException]:
    """Run ``fn`` on every item (concurrently or in order) and return the failures; every call runs
    to its end, so the caller knows exactly what was done before it rolls back."""
    failures: list[BaseException] = []

    async def guarded(item: T) -> None:
        try:
            await fn(item)
        except Exception as exc:
            failures.append(exc)

    if parallel and len(items) > 1:
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(guarded, item)
    else:
        for item in items:
            await guarded(item)
    return failures


class DriverCuda:
    """The CUDA step through the driver's checkpoint API (cuda-bindings, or the cuda-checkpoint binary).

    One instance serves one checkpoint (``prepare`` .. ``release``/``abort``) or one restore."""

    def __init__(
        self,
        driver: CheckpointDriver | None = None,
        lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        parallel: bool = True,
        node_gpus: Callable[[], list[Gpu]] = cuda_devices.gpus,
        node_driver_version: Callable[[], str | None] = cuda_devices.driver_version,
        restore_onto: Sequence[str] = (),
        compute_gpus: Callable[[Sequence[int]], Mapping[int, tuple[str, ...]]] = cuda_devices.compute_gpus,
    ):
        self._driver = driver
        self._compute_gpus = compute_gpus
        # GPU UUIDs a restore puts the checkpoint on, instead of the GPUs the target can see (a plain
        # process tree on the host sees every GPU of the node; a container only its own)
        self.restore_onto = tuple(restore_onto)
        self.lock_timeout_s = lock_timeout_s
        self.parallel = parallel
        self._node_gpus = node_gpus
        self._node_driver_version = node_driver_version
        self._tracked: list[_Tracked] = []
        self.gpu_pairs: list[GpuPair] = []  # the remapping of the last restore, for the record

    async def _get_driver(self) -> CheckpointDriver:
        if self._driver is None:
            self._driver = await anyio.to_thread.run_sync(load_driver)
        return self._driver

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args)

    async def node_state(self) -> CudaState:
        node = self._node_gpus()
        return CudaState(
            driver_version=self._node_driver_version(),
            gpus=tuple(g.uuid for g in node),
            gpu_models=tuple(g.model for g in node),
        )

    # -- checkpoint ------------------------------------------------------------------------------

    async def prepare(self, pids: Sequence[int]) -> None:
        """Find the tree's CUDA processes, refuse helpers holding NVIDIA devices, lock all."""
        self._tracked = []
        users = [u for u in map(cuda_devices.nvidia_usage, cuda_devices.thread_group_leaders(list(pids))) if u.any]
        if not users:
            log.info("no process of the workload uses an NVIDIA device; nothing to CUDA-checkpoint")
            return
        driver = await self._get_driver()
        helpers: list[tuple[NvidiaUsage, str]] = []
        cuda_users: list[NvidiaUsage] = []
        for usage in users:
            try:
                state = await self._call(driver.state, usage.pid)
            except NotACudaProcess as exc:
                helpers.append((usage, str(exc).split("(", 1)[-1].rstrip(")")))
                continue
            if state is not ProcessState.RUNNING:
                raise CudaError(
                    f"{cuda_devices.describe_process(usage.pid)} is already CUDA-{state} (another checkpoint "
                    "running, or a failed one); nothing was locked"
                )
            cuda_users.append(usage)
        if helpers:
            raise CudaHelperProcesses(helpers)
        by_minor = {g.minor: g for g in self._node_gpus()}
        known = {g.uuid for g in by_minor.values()}
        computing: Mapping[int, tuple[str, ...]] = {}
        with anyio.move_on_after(NVML_TIMEOUT_S) as waited:  # a wedged NVML must not hold up the checkpoint
            computing = await anyio.to_thread.run_sync(
                self._compute_gpus, [u.pid for u in cuda_users], abandon_on_cancel=True
            )
        if waited.cancelled_caught:
            log.warning("NVML did not answer; recording every GPU the processes can see", seconds=NVML_TIMEOUT_S)
        self._tracked = []
        for u in cuda_users:
            seen = tuple(by_minor[m].uuid for m in u.gpu_minors if m in by_minor)
            used = computing.get(u.pid)
            self._tracked.append(_Tracked(u.pid, seen, used if used and set(used) <= set(seen) <= known else None))
        timeout_ms = max(1, int(self.lock_timeout_s * 1000))
        for tracked in self._tracked:  # one at a time: a timeout stops the rest from being locked at all
            try:
                await self._call(driver.lock, tracked.pid, timeout_ms)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._rollback()
                raise
            tracked.locked = True
        log.info("CUDA processes locked", pids=[t.pid for t in self._tracked], driver=driver.name)

    async def checkpoint(self) -> CudaState:
        if not self._tracked:
            return CudaState()
        driver = await self._get_driver()

        async def one(tracked: _Tracked) -> None:
            await self._call(driver.checkpoint, tracked.pid)
            tracked.checkpointed = True

        failures = await _each(self._tracked, one, self.parallel)
        if failures:
            with anyio.CancelScope(shield=True):
                await self._rollback()
            raise failures[0]
        node = {g.uuid: g for g in self._node_gpus()}
        used = sorted({u for t in self._tracked for u in t.gpus})
        return CudaState(
            driver_version=self._node_driver_version(),
            gpus=tuple(used),
            processes=tuple(t.pid for t in self._tracked),
            gpu_models=tuple(node[u].model if u in node else "" for u in used),
            process_gpus={t.pid: t.gpus for t in self._tracked},
            process_compute_gpus={t.pid: t.computing for t in self._tracked if t.computing is not None},
        )

    async def release(self) -> None:
        """After a stored dump: restore (same GPUs) and unlock the source processes."""
        if not self._tracked:
            return
        failures = await self._bring_back(self._tracked)
        if failures:
            raise failures[0]

    async def resume(self, pids: Sequence[int]) -> list[int]:
        """A source an earlier agent left (it died after the dump): bring back every CUDA process by what
        the driver says of it - checkpointed: restore and unlock; locked: unlock; running: nothing. Returns
        the PIDs brought back. Knows nothing of that agent's own record, so it works after a restart."""
        # Every process is asked, not only those holding NVIDIA devices: a checkpointed one holds none.
        leaders = cuda_devices.thread_group_leaders(list(pids))
        if not leaders:
            return []
        driver = await self._get_driver()
        pending: list[_Tracked] = []
        for pid in leaders:
            try:
                state = await self._call(driver.state, pid)
            except NotACudaProcess:
                continue
            if state in (ProcessState.LOCKED, ProcessState.CHECKPOINTED):
                pending.append(_Tracked(pid, (), locked=True, checkpointed=state is ProcessState.CHECKPOINTED))
        failures = await self._bring_back(pending)
        if failures:
            raise failures[0]
        return [t.pid for t in pending]

    async def abort(self) -> None:
        """Bring back whatever this step locked or checkpointed; processes already gone are skipped."""
        await self._rollback()

    async def _rollback(self) -> None:
        pending = [t for t in self._tracked if (t.locked or t.checkpointed) and procfs.proc(t.pid).exists()]
        if not pending:
            return
        for failure in await self._bring_back(pending):
            log.error("CUDA rollback failed; the process may stay CUDA-locked", error=str(failure))

    async def _bring_back(self, tracked: Sequence[_Tracked]) -> list[BaseException]:
        """Restore what was checkpointed, then unlock what was locked (all restores before any unlock,
        so no process resumes while a peer still lacks its GPU state)."""
        driver = await self._get_driver()

        async def restore(t: _Tracked) -> None:
            if t.checkpointed:
                await self._call(driver.restore, t.pid, ())
                t.checkpointed = False

        failures = await _each([t for t in tracked if t.checkpointed], restore, self.parallel)

        async def unlock(t: _Tracked) -> None:
            if t.locked and not t.checkpointed:
                await self._call(driver.unlock, t.pid)
                t.locked = False

        failures += await _each([t for t in tracked if t.locked], unlock, self.parallel)
        return failures

    # -- restore ---------------------------------------------------------------------------------

    def _plan(self, recorded: CudaState, target_pid: int) -> list[GpuPair]:
        node = self._node_gpus()
        visible = cuda_devices.visible_gpus(target_pid, node)
        target = visible
        if self.restore_onto:
            by_uuid = {g.uuid: g for g in node}
            if unknown := [u for u in self.restore_onto if u not in by_uuid]:
                have = ", ".join(g.uuid for g in node) or "none"
                raise CudaError(f"cannot restore onto {', '.join(unknown)}: not a GPU of this node (it has {have})")
            target = [by_uuid[u] for u in self.restore_onto]
        try:
            return cuda_devices.plan_gpu_pairs(recorded.devices, target, recorded.computing, visible)
        except GpuMismatch as exc:
            raise CudaError(f"cannot restore into PID {target_pid}'s GPUs: {exc}") from None

    async def check_restore(self, recorded: CudaState, target_pid: int) -> None:
        if not recorded.processes:
            return
        await self._get_driver()  # a node without the API fails here, before anything is touched
        pairs = self._plan(recorded, target_pid)
        if pairs:
            log.info("restore will remap GPUs", pairs=pairs)

    async def restore(self, pids: Sequence[int], recorded: CudaState) -> None:
        """Restore the GPU state of every CUDA-checkpointed process of the restored tree, then unlock."""
        if not recorded.processes:
            return
        driver = await self._get_driver()
        checkpointed = []
        for pid in cuda_devices.thread_group_leaders(list(pids)):
            try:
                state = await self._call(driver.state, pid)
            except NotACudaProcess:
                continue
            if state is ProcessState.CHECKPOINTED:
                checkpointed.append(pid)
            elif state is not ProcessState.RUNNING:
                raise CudaError(f"{cuda_devices.describe_process(pid)} is CUDA-{state} after the CRIU restore")
        if len(checkpointed) != len(recorded.processes):
            raise CudaError(
                f"the checkpoint recorded {len(recorded.processes)} CUDA processes {list(recorded.processes)}, "
                f"the restored tree has {len(checkpointed)} in the checkpointed state {checkpointed}"
            )
        pairs = self._plan(recorded, checkpointed[0])
        self.gpu_pairs = pairs
        self._tracked = []
        pairs_of: dict[int, list[GpuPair]] = {}
        for pid in checkpointed:
            own = recorded.process_gpus.get(_recorded_pid(pid), ())
            # The driver wants every GPU the process was checkpointed on, and only those.
            pairs_of[pid] = [p for p in pairs if p[0] in own] if own else list(pairs)
            tid = await self._call(driver.restore_thread_id, pid)
            if not (procfs.proc(pid) / "task" / str(tid)).exists():
                raise CudaError(f"PID {pid}: its CUDA restore thread {tid} is missing after the CRIU restore")
            self._tracked.append(_Tracked(pid, tuple(new for _, new in pairs_of[pid]), locked=True, checkpointed=True))

        async def one(t: _Tracked) -> None:
            try:
                await self._call(driver.restore, t.pid, pairs_of[t.pid])
            except CudaError as exc:
                raise CudaError(f"CUDA restore of PID {t.pid} failed: {exc}") from exc
            t.checkpointed = False

        failures = await _each(self._tracked, one, self.parallel)
        if failures:
            raise failures[0]

        async def unlock(t: _Tracked) -> None:
            await self._call(driver.unlock, t.pid)
            t.locked = False

        failures = await _each(self._tracked, unlock, self.parallel)
        if failures:
            raise failures[0]
        log.info("CUDA state restored", pids=checkpointed, gpu_pairs=pairs, driver=driver.name)


def _recorded_pid(host_pid: int) -> int:
    """The PID a restored process has in its own namespace (what the manifest recorded)."""
    try:
        return procfs.ns_pid(host_pid)
    except (OSError, KeyError, ValueError):
        return host_pid
