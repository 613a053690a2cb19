"""Ordering of the CUDA step (DriverCuda) against a recording stand-in for the driver: refuse helpers
before any lock, lock all then checkpoint all, roll back what was done on failure, restore all before
unlocking any. Only the order of calls is tested here; the driver itself is exercised by tests/gpu on
a real GPU."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda import driverstep as cuda_module
from dynamo_snapshot.agent.cuda.devices import Gpu, NvidiaUsage
from dynamo_snapshot.agent.cuda.driver import CudaError, CudaLockTimeout, NotACudaProcess, ProcessState
from dynamo_snapshot.agent.cuda.driverstep import CudaHelperProcesses, DriverCuda
from dynamo_snapshot.agent.cuda.state import CudaState
from dynamo_snapshot.agent.cuda.step import NoCuda
from dynamo_snapshot.agent.host import procfs

GPU0 = Gpu("GPU-00000000-0000-0000-0000-000000000000", "NVIDIA H200", 0)
GPU1 = Gpu("GPU-11111111-0000-0000-0000-000000000000", "NVIDIA H200", 1)


class RecordingDriver:
    """Keeps a per-PID state like the driver does and records every call in order."""

    name = "recording"

    def __init__(self, cuda_pids: Sequence[int], fail: dict[tuple[str, int], Exception] | None = None):
        self.states = {pid: ProcessState.RUNNING for pid in cuda_pids}
        self.fail = fail or {}
        self.calls: list[tuple[str, int]] = []
        self.pairs: dict[int, list[tuple[str, str]]] = {}

    def _enter(self, op: str, pid: int) -> None:
        self.calls.append((op, pid))
        if (op, pid) in self.fail:
            raise self.fail[(op, pid)]
        if pid not in self.states:
            raise NotACudaProcess(f"PID {pid} is not a CUDA process (cuCheckpointProcessGetState: CUDA_ERROR_X)")

    def state(self, pid: int) -> ProcessState:
        self._enter("state", pid)
        return self.states[pid]

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._enter("lock", pid)
        self.states[pid] = ProcessState.LOCKED

    def checkpoint(self, pid: int) -> None:
        self._enter("checkpoint", pid)
        self.states[pid] = ProcessState.CHECKPOINTED

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        self._enter("restore", pid)
        self.pairs[pid] = list(gpu_pairs)
        self.states[pid] = ProcessState.LOCKED

    def unlock(self, pid: int) -> None:
        self._enter("unlock", pid)
        self.states[pid] = ProcessState.RUNNING

    def restore_thread_id(self, pid: int) -> int:
        self._enter("restore_thread_id", pid)
        return pid

    def ops(self, *kinds: str) -> list[tuple[str, int]]:
        return [c for c in self.calls if c[0] in kinds]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, NvidiaUsage]]:
    """Processes 10, 11, 12 (10 and 11 on GPU 0, 12 on GPU 1) and 13 without GPU; a /proc with their
    task directories (the step checks that processes and restore threads still exist)."""
    usage = {
        10: NvidiaUsage(10, mapped=("/dev/nvidia0", "/dev/nvidiactl")),
        11: NvidiaUsage(11, open_files=("/dev/nvidia0",)),
        12: NvidiaUsage(12, mapped=("/dev/nvidia1",)),
        13: NvidiaUsage(13),
    }
    for pid in usage:
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
    monkeypatch.setattr(cuda_devices, "thread_group_leaders", lambda tids: sorted(set(tids)))
    monkeypatch.setattr(cuda_devices, "nvidia_usage", lambda pid: usage.get(pid, NvidiaUsage(pid)))
    monkeypatch.setattr(cuda_devices, "visible_gpus", lambda pid, node: node)
    monkeypatch.setattr(procfs, "ns_pid", lambda pid, parent=None: pid)
    with procfs.configured(tmp_path):
        yield usage


def step(
    driver: RecordingDriver, gpus: list[Gpu] | None = None, computing: dict[int, tuple[str, ...]] | None = None
) -> DriverCuda:
    return DriverCuda(
        driver=driver,
        parallel=False,
        node_gpus=lambda: list(gpus or [GPU0, GPU1]),
        node_driver_version=lambda: "580.159.04",
        compute_gpus=lambda pids: {pid: used for pid, used in (computing or {}).items() if pid in pids},
    )


def test_all_are_locked_before_any_is_checkpointed(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 11, 12])
    cuda = step(driver)
    anyio.run(cuda.prepare, [10, 11, 12, 13])
    state = anyio.run(cuda.checkpoint)
    assert driver.ops("lock", "checkpoint") == [
        ("lock", 10), ("lock", 11), ("lock", 12), ("checkpoint", 10), ("checkpoint", 11), ("checkpoint", 12)
    ]  # fmt: skip
    assert ("state", 13) not in driver.calls  # no NVIDIA device: never asked about
    assert state.processes == (10, 11, 12)
    assert state.gpus == (GPU0.uuid, GPU1.uuid) and state.gpu_models == ("NVIDIA H200", "NVIDIA H200")
    assert state.driver_version == "580.159.04"
    assert dict(state.process_gpus) == {10: (GPU0.uuid,), 11: (GPU0.uuid,), 12: (GPU1.uuid,)}


def test_a_process_is_recorded_with_the_gpus_it_sees_and_those_it_computes_on(
    tree: dict[int, NvidiaUsage],
) -> None:
    """Seen on two GPUs: each CUDA process held /dev/nvidia0 and /dev/nvidia1 (the driver checkpoints
    both) while NVML placed it on one (the only one a restore must give it)."""
    tree[10] = NvidiaUsage(10, open_files=("/dev/nvidia0", "/dev/nvidia1"))
    tree[12] = NvidiaUsage(12, open_files=("/dev/nvidia0", "/dev/nvidia1"))
    driver = RecordingDriver([10, 12])
    cuda = step(driver, computing={10: (GPU1.uuid,), 12: ("MIG-not-a-gpu-of-this-node",)})
    anyio.run(cuda.prepare, [10, 12])
    state = anyio.run(cuda.checkpoint)
    assert dict(state.process_gpus) == {10: (GPU0.uuid, GPU1.uuid), 12: (GPU0.uuid, GPU1.uuid)}
    # 12: what NVML said is not a GPU it can see, so nothing is claimed for it (all it sees counts)
    assert dict(state.process_compute_gpus) == {10: (GPU1.uuid,)}
    back = CudaState.from_manifest(
        {
            "compatibility": {
                "gpus": [{"uuid": GPU0.uuid, "model": GPU0.model}, {"uuid": GPU1.uuid, "model": GPU1.model}]
            },
            "cuda": state.manifest_block(),
        }
    )
    assert dict(back.process_compute_gpus) == {10: (GPU1.uuid,)} and back.computing == {GPU0.uuid, GPU1.uuid}


def test_a_wedged_nvml_does_not_hold_up_the_checkpoint(
    tree: dict[int, NvidiaUsage], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cuda_module, "NVML_TIMEOUT_S", 0.2)
    released = threading.Event()
    driver = RecordingDriver([10])
    cuda = DriverCuda(driver=driver, parallel=False, node_gpus=lambda: [GPU0, GPU1],
                      node_driver_version=lambda: "580.159.04",
                      compute_gpus=lambda pids: released.wait(30) and {})
    try:
        anyio.run(cuda.prepare, [10])
        state = anyio.run(cuda.checkpoint)
    finally:
        released.set()
    assert dict(state.process_gpus) == {10: (GPU0.uuid,)} and dict(state.process_compute_gpus) == {}


def test_a_process_that_saw_two_gpus_moves_to_the_one_it_is_given(tree: dict[int, NvidiaUsage]) -> None:
    """Both GPUs visible, computing on GPU 0, restored onto GPU 1 only: the driver gets a pair for each
    GPU it checkpointed, the computing one onto GPU 1 and the idle one onto what is left."""
    driver = RecordingDriver([10])
    driver.states = {10: ProcessState.CHECKPOINTED}
    cuda = step(driver)
    cuda.restore_onto = (GPU1.uuid,)
    state = CudaState(
        driver_version="580.159.04",
        gpus=(GPU0.uuid, GPU1.uuid),
        processes=(10,),
        gpu_models=(GPU0.model,) * 2,
        process_gpus={10: (GPU0.uuid, GPU1.uuid)},
        process_compute_gpus={10: (GPU0.uuid,)},
    )
    anyio.run(cuda.restore, [10], state)
    assert driver.pairs == {10: [(GPU0.uuid, GPU1.uuid), (GPU1.uuid, GPU0.uuid)]}


def test_a_helper_with_nvidia_mappings_is_refused_before_any_lock(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 11])  # 12 maps /dev/nvidia1 but the driver knows no CUDA state for it
    with pytest.raises(CudaHelperProcesses, match=r"PID 12 .*maps /dev/nvidia1 but is not a CUDA process") as err:
        anyio.run(step(driver).prepare, [10, 11, 12])
    assert err.value.pids == [12]
    assert "stop_gpu_helpers" in str(err.value) and "nothing was locked" in str(err.value)
    assert driver.ops("lock", "checkpoint") == []


def test_a_lock_timeout_unlocks_what_was_locked_and_locks_no_more(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 11, 12], fail={("lock", 11): CudaLockTimeout("PID 11 could not be CUDA-locked")})
    with pytest.raises(CudaLockTimeout):
        anyio.run(step(driver).prepare, [10, 11, 12])
    assert driver.ops("lock", "unlock", "checkpoint") == [("lock", 10), ("lock", 11), ("unlock", 10)]
    assert driver.states == {10: ProcessState.RUNNING, 11: ProcessState.RUNNING, 12: ProcessState.RUNNING}


def test_a_failed_checkpoint_restores_then_unlocks_the_others(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 11, 12], fail={("checkpoint", 11): CudaError("cuCheckpointProcessCheckpoint failed")})
    cuda = step(driver)
    anyio.run(cuda.prepare, [10, 11, 12])
    with pytest.raises(CudaError, match="cuCheckpointProcessCheckpoint failed"):
        anyio.run(cuda.checkpoint)
    after = driver.calls[driver.calls.index(("checkpoint", 12)) + 1 :]
    # 10 and 12 were checkpointed: restored first; then everything locked is unlocked.
    assert after == [("restore", 10), ("restore", 12), ("unlock", 10), ("unlock", 11), ("unlock", 12)]
    assert set(driver.states.values()) == {ProcessState.RUNNING}


def test_release_gives_the_source_its_gpu_state_back(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 12])
    cuda = step(driver)
    anyio.run(cuda.prepare, [10, 12])
    anyio.run(cuda.checkpoint)
    driver.calls.clear()
    anyio.run(cuda.release)
    assert driver.calls == [("restore", 10), ("restore", 12), ("unlock", 10), ("unlock", 12)]
    assert driver.pairs == {10: [], 12: []}


def test_abort_skips_processes_that_are_gone(tree: dict[int, NvidiaUsage], tmp_path: Path) -> None:
    driver = RecordingDriver([10, 12])
    cuda = step(driver)
    anyio.run(cuda.prepare, [10, 12])
    (tmp_path / "12" / "task" / "12").rmdir()
    (tmp_path / "12" / "task").rmdir()
    (tmp_path / "12").rmdir()  # killed by the checkpoint guard
    driver.calls.clear()
    anyio.run(cuda.abort)
    assert driver.calls == [("unlock", 10)]


def recorded(processes: dict[int, tuple[Gpu, ...]]) -> CudaState:
    gpus = sorted({g for used in processes.values() for g in used}, key=lambda g: g.minor)
    return CudaState(
        driver_version="580.159.04",
        gpus=tuple(g.uuid for g in gpus),
        processes=tuple(processes),
        gpu_models=tuple(g.model for g in gpus),
        process_gpus={pid: tuple(g.uuid for g in used) for pid, used in processes.items()},
    )


def test_restore_brings_back_all_before_unlocking_any(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 12])
    driver.states = {10: ProcessState.CHECKPOINTED, 12: ProcessState.CHECKPOINTED}
    cuda = step(driver)
    anyio.run(cuda.restore, [10, 12, 13], recorded({10: (GPU0,), 12: (GPU1,)}))
    assert driver.ops("restore", "unlock") == [("restore", 10), ("restore", 12), ("unlock", 10), ("unlock", 12)]
    assert driver.pairs == {10: [], 12: []}  # the same GPUs are here: no remapping


def test_restore_onto_other_gpus_passes_each_process_its_pairs(tree: dict[int, NvidiaUsage]) -> None:
    gpu_a = Gpu("GPU-aaaaaaaa-0000-0000-0000-000000000000", "NVIDIA H200", 0)
    gpu_b = Gpu("GPU-bbbbbbbb-0000-0000-0000-000000000000", "NVIDIA H200", 1)
    driver = RecordingDriver([10, 12])
    driver.states = {10: ProcessState.CHECKPOINTED, 12: ProcessState.CHECKPOINTED}
    cuda = step(driver, gpus=[gpu_a, gpu_b])
    anyio.run(cuda.restore, [10, 12], recorded({10: (GPU0,), 12: (GPU1,)}))
    assert driver.pairs == {10: [(GPU0.uuid, gpu_a.uuid)], 12: [(GPU1.uuid, gpu_b.uuid)]}


def test_restore_onto_named_gpus_moves_every_process_there(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10, 11])
    driver.states = {10: ProcessState.CHECKPOINTED, 11: ProcessState.CHECKPOINTED}
    cuda = step(driver)
    cuda.restore_onto = (GPU1.uuid,)  # both ran on GPU 0, which the host tree could still see
    anyio.run(cuda.restore, [10, 11], recorded({10: (GPU0,), 11: (GPU0,)}))
    assert driver.pairs == {10: [(GPU0.uuid, GPU1.uuid)], 11: [(GPU0.uuid, GPU1.uuid)]}


def test_restore_onto_a_gpu_the_node_lacks_is_refused_naming_it(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10])
    cuda = step(driver)
    cuda.restore_onto = ("GPU-ffffffff-0000-0000-0000-000000000000",)
    with pytest.raises(CudaError, match=r"cannot restore onto GPU-ffffffff-.*: not a GPU of this node"):
        anyio.run(cuda.check_restore, recorded({10: (GPU0,)}), 99)
    assert driver.calls == []


def test_restore_refuses_gpus_of_another_model_before_touching_anything(tree: dict[int, NvidiaUsage]) -> None:
    h100 = Gpu("GPU-dddddddd-0000-0000-0000-000000000000", "NVIDIA H100 80GB HBM3", 0)
    driver = RecordingDriver([10])
    with pytest.raises(CudaError, match=r"cannot restore into PID 99's GPUs: the checkpoint ran on NVIDIA H200"):
        anyio.run(step(driver, gpus=[h100]).check_restore, recorded({10: (GPU0,)}), 99)
    assert driver.calls == []


def test_restore_refuses_a_tree_whose_cuda_processes_do_not_match(tree: dict[int, NvidiaUsage]) -> None:
    driver = RecordingDriver([10])
    driver.states = {10: ProcessState.CHECKPOINTED}
    with pytest.raises(CudaError, match=r"recorded 2 CUDA processes \[10, 12\], the restored tree has 1"):
        anyio.run(step(driver).restore, [10, 12], recorded({10: (GPU0,), 12: (GPU1,)}))
    assert driver.ops("restore", "unlock") == []


def test_cuda_state_round_trips_through_the_manifest() -> None:
    state = recorded({10: (GPU0,), 12: (GPU1,)})
    manifest = {
        "compatibility": {"cudaDriverVersion": "580.159.04", "gpus": [{"uuid": GPU0.uuid, "model": GPU0.model},
                                                                      {"uuid": GPU1.uuid, "model": GPU1.model}]},
        "cuda": state.manifest_block(),
    }  # fmt: skip
    back = CudaState.from_manifest(manifest)
    assert back == state


def test_no_cuda_refuses_a_checkpoint_that_holds_cuda_state() -> None:
    with pytest.raises(Exception, match="no CUDA restore step configured"):
        anyio.run(NoCuda().check_restore, recorded({10: (GPU0,)}), 1)


def test_a_source_a_dead_agent_left_gets_its_gpu_state_back_by_the_drivers_word(
    tree: dict[int, NvidiaUsage],
) -> None:
    """A restarted agent has no record of what its predecessor did: each process is brought back by the
    driver's state of it - checkpointed: restored then unlocked, locked: unlocked, running: left alone."""
    driver = RecordingDriver([10, 11, 12, 13])
    # 13 holds no NVIDIA device: once checkpointed, a process has given its device files back
    driver.states.update({10: ProcessState.CHECKPOINTED, 11: ProcessState.LOCKED, 13: ProcessState.CHECKPOINTED})
    resumed = anyio.run(step(driver).resume, [10, 11, 12, 13, 14])
    assert sorted(resumed) == [10, 11, 13]
    assert driver.ops("restore", "unlock") == [("restore", 10), ("restore", 13), ("unlock", 10), ("unlock", 11),
                                               ("unlock", 13)]
    assert set(driver.states.values()) == {ProcessState.RUNNING}
    assert anyio.run(NoCuda().resume, [10]) == []
