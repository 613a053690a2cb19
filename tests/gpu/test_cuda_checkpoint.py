"""The CUDA step and the process-tree pipeline on a real GPU: a PyTorch worker (weights in device
memory, an explicitly captured CUDA graph, a TCP server) is CUDA-locked, checkpointed, dumped by
CRIU, restored and checked. Tests in this module share one worker and run in file order; the last
ones replace it by its restored self."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.driver import (
    CudaLockTimeout,
    NotACudaProcess,
    ProcessState,
    load_driver,
)
from dynamo_snapshot.agent.cuda.driverstep import CudaHelperProcesses, DriverCuda
from dynamo_snapshot.agent.host import procfs
from tests.gpu.worker_client import Worker, reap, request

NETWORK_LOCK = os.environ.get("DYN_SNAPSHOT_TEST_NETWORK_LOCK", "nftables")


def tasks(pid: int) -> list[int]:
    return sorted({t for p in procfs.process_tree(pid) for t in procfs.threads(p)})


@pytest.mark.gpu
def test_node_inventory_names_driver_and_gpus() -> None:
    version = cuda_devices.driver_version()
    gpus = cuda_devices.gpus()
    assert version and version.count(".") >= 1
    assert gpus and all(g.uuid.startswith(("GPU-", "MIG-")) and g.model for g in gpus)


@pytest.mark.gpu
def test_a_pid_without_cuda_is_a_clear_error() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(NotACudaProcess, match=rf"PID {sleeper.pid} is not a CUDA process"):
            load_driver().state(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.gpu
def test_a_helper_holding_nvidia_mappings_is_refused_before_anything_is_locked(worker: Worker) -> None:
    helper = request({"cmd": "fork_helper"})["helper_pid"]
    try:
        assert cuda_devices.nvidia_usage(helper).any  # it inherited the worker's device mappings
        with pytest.raises(CudaHelperProcesses, match=rf"PID {helper} .* is not a CUDA process") as refused:
            anyio.run(DriverCuda().prepare, tasks(worker.pid))
        assert refused.value.pids == [helper]
        assert load_driver().state(worker.pid) is ProcessState.RUNNING  # nothing was locked
    finally:
        request({"cmd": "kill_helper"})
    assert worker.state()["matches_reference"]


@pytest.mark.gpu
def test_a_lock_timeout_leaves_the_worker_running(worker: Worker) -> None:
    request({"cmd": "spin", "ms": 4000})
    time.sleep(0.5)
    step = DriverCuda(lock_timeout_s=0.2)
    try:
        anyio.run(step.prepare, tasks(worker.pid))
    except CudaLockTimeout as exc:
        timed_out: CudaLockTimeout | None = exc
    else:
        anyio.run(step.abort)  # locked after all: let the worker go before failing
        timed_out = None
    assert timed_out is not None and f"PID {worker.pid} could not be CUDA-locked within 200 ms" in str(timed_out)
    assert load_driver().state(worker.pid) is ProcessState.RUNNING
    time.sleep(4.0)
    assert worker.state()["matches_reference"]


@pytest.mark.gpu
def test_checkpoint_releases_the_devices_and_restore_with_a_gpu_pair_brings_them_back(worker: Worker) -> None:
    driver = load_driver()
    # the driver checkpointed every GPU the worker can see (all of this machine's): a pair for each
    same = [(g.uuid, g.uuid) for g in cuda_devices.gpus()]
    driver.lock(worker.pid, 10_000)
    assert driver.state(worker.pid) is ProcessState.LOCKED
    driver.checkpoint(worker.pid)
    assert driver.state(worker.pid) is ProcessState.CHECKPOINTED
    assert not cuda_devices.nvidia_usage(worker.pid).any  # nothing left for CRIU to trip over
    assert driver.restore_thread_id(worker.pid) in procfs.threads(worker.pid)
    driver.restore(worker.pid, same)  # the remapping path of the API, onto the same GPUs
    driver.unlock(worker.pid)
    assert driver.state(worker.pid) is ProcessState.RUNNING
    assert worker.state()["matches_reference"]


@pytest.mark.gpu
def test_a_worker_an_agent_left_checkpointed_is_brought_back_by_the_next_agent(worker: Worker) -> None:
    """What a restarted agent does with a source its predecessor was killed in: it knows nothing of it but
    what the driver says of each process (checkpointed, locked), and brings it back."""
    driver = load_driver()
    driver.lock(worker.pid, 10_000)
    driver.checkpoint(worker.pid)
    resumed = anyio.run(DriverCuda().resume, tasks(worker.pid))  # a fresh step: no record of the lock
    assert resumed == [worker.pid]
    assert driver.state(worker.pid) is ProcessState.RUNNING
    assert worker.state()["matches_reference"]
    driver.lock(worker.pid, 10_000)  # locked only (the agent died between lock and checkpoint)
    assert anyio.run(DriverCuda().resume, tasks(worker.pid)) == [worker.pid]
    assert driver.state(worker.pid) is ProcessState.RUNNING
    assert worker.state()["matches_reference"]


def _roundtrip(worker: Worker, bundle: criu.CriuBundle, base: Path, name: str, release_weights: bool) -> dict:
    prepared = request({"cmd": "prepare", "empty_cache": True, "release_weights": release_weights})
    settings = criu.CriuSettings(network_lock=NETWORK_LOCK)
    stored = anyio.run(lambda: tree.checkpoint_tree(worker.pid, base, name, bundle, DriverCuda(), settings))
    if not release_weights:  # the source got its GPU state back and still computes the same
        assert worker.state()["matches_reference"]
    reap(worker.pid)
    restored = anyio.run(
        lambda: tree.restore_tree(base, name, bundle, DriverCuda(), settings, prefetch=[worker.weights])
    )
    assert restored.pid == worker.pid
    after = request({"cmd": "after_restore"})  # a new connection: the listening socket came back
    assert after["reloaded"] is release_weights
    state = worker.state()  # weight checksums, compiled outputs, the captured graph replayed
    assert state["matches_reference"], state
    return {"prepared": prepared, "manifest": stored.manifest, "restored": restored}


@pytest.mark.gpu
def test_tree_checkpoint_and_restore_keep_weights_graphs_and_socket(
    worker: Worker, bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    done = _roundtrip(worker, bundle, tmp_path, "with-weights", release_weights=False)
    manifest = done["manifest"]
    assert manifest["compatibility"]["cudaDriverVersion"] == cuda_devices.driver_version()
    node = {g.uuid for g in cuda_devices.gpus()}
    seen = manifest["compatibility"]["gpus"]  # a process on the host sees (and the driver keeps) every GPU
    assert {g["uuid"] for g in seen} == node and all(g["model"] for g in seen)
    assert manifest["cuda"]["processes"] == [worker.pid]
    assert set(manifest["cuda"]["processGpus"][str(worker.pid)]) == node
    (computing,) = manifest["cuda"]["processComputeGpus"][str(worker.pid)]  # NVML: the one it computes on
    assert computing in node


@pytest.mark.gpu
def test_weights_released_before_the_checkpoint_are_reloaded_after_the_restore(
    worker: Worker, bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    if os.environ.get("DYN_SNAPSHOT_TEST_ALLOC", "vmm") != "vmm":
        pytest.skip("needs the worker's weights in a VMM range (DYN_SNAPSHOT_TEST_ALLOC=vmm)")
    weights_bytes = 1 << 30
    full = _roundtrip(worker, bundle, tmp_path / "a", "full", release_weights=False)
    slim = _roundtrip(worker, bundle, tmp_path / "b", "slim", release_weights=True)
    pages = [sum(f["size"] for f in m["manifest"]["files"] if f["path"].startswith("pages-")) for m in (full, slim)]
    assert pages[0] - pages[1] > 0.9 * weights_bytes  # the weights are no longer in the image
