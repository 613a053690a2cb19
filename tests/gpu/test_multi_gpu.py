"""Two CUDA processes in one tree (a tensor-parallel worker's shape) and a restore onto another GPU,
through the project's pipeline (``agent.tree``, ``DriverCuda``) on a machine with two GPUs: the node a
new replica lands on rarely gives it the GPU its checkpoint ran on.

What each test saw (device files held, nvidia-smi's placement, the manifest) is written as JSON into
``$DYN_SNAPSHOT_TEST_RECORD`` when that is set."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.driverstep import DriverCuda
from tests.gpu.worker_client import MultiWorker

NETWORK_LOCK = os.environ.get("DYN_SNAPSHOT_TEST_NETWORK_LOCK", "nftables")

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpus() -> list[cuda_devices.Gpu]:
    found = sorted(cuda_devices.gpus(), key=lambda g: g.minor)
    if len(found) < 2 or found[0].model != found[1].model:
        pytest.skip("needs two GPUs of one model")
    return found


@pytest.fixture
def start_multi(tmp_path: Path, subreaper: None) -> Iterator[Callable[[int, int], MultiWorker]]:
    started: list[MultiWorker] = []

    def start(parent_gpu: int, child_gpu: int) -> MultiWorker:
        worker = MultiWorker.start(tmp_path, parent_gpu, child_gpu)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def gpus_in_use() -> dict[int, set[str]]:
    """PID -> UUIDs of the GPUs it has memory on, as nvidia-smi reports them."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    placed: dict[int, set[str]] = {}
    for line in out.splitlines():
        pid, _, uuid = line.partition(",")
        if pid.strip().isdigit():
            placed.setdefault(int(pid), set()).add(uuid.strip())
    return placed


def seen(worker: MultiWorker) -> dict[str, Any]:
    placed = gpus_in_use()
    return {
        str(pid): {
            "nvidiaSmi": sorted(placed.get(pid, ())),
            "deviceFiles": list(cuda_devices.nvidia_usage(pid).gpu_minors),
        }
        for pid in (worker.pid, worker.child_pid)
    }


def record(name: str, data: dict[str, Any]) -> None:
    if out := os.environ.get("DYN_SNAPSHOT_TEST_RECORD"):
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=2, default=str))


def all_ok(reply: dict) -> bool:
    return all(reply[p]["bits_ok"] and reply[p]["product_ok"] for p in ("parent", "child"))


def roundtrip(worker: MultiWorker, bundle: criu.CriuBundle, base: Path, name: str, step: DriverCuda) -> dict:
    settings = criu.CriuSettings(network_lock=NETWORK_LOCK)
    before = seen(worker)
    stored = anyio.run(lambda: tree.checkpoint_tree(worker.pid, base, name, bundle, DriverCuda(), settings))
    assert all_ok(worker.check())  # the source got both processes' GPU state back
    worker.stop()
    restored = anyio.run(lambda: tree.restore_tree(base, name, bundle, step, settings))
    assert restored.pid == worker.pid
    reply = worker.check()
    done = {
        "before": before,
        "cuda": stored.manifest["cuda"],
        "pairs": restored.gpu_pairs,
        "after": seen(worker),
        "check": reply,
        "seconds": restored.seconds,
    }
    record(name, done)
    assert all_ok(reply), reply  # the tensors' bits and a product on them, in both processes
    assert reply["child_pid"] == worker.child_pid
    return done


def test_both_cuda_processes_of_a_worker_on_two_gpus_come_back(
    gpus: list[cuda_devices.Gpu],
    start_multi: Callable[[int, int], MultiWorker],
    bundle: criu.CriuBundle,
    tmp_path: Path,
) -> None:
    worker = start_multi(0, 1)
    done = roundtrip(worker, bundle, tmp_path, "two-gpus", DriverCuda())
    assert sorted(done["cuda"]["processes"]) == sorted([worker.pid, worker.child_pid])
    assert done["pairs"] == []  # the same GPUs are here
    # the manifest records for each process the GPU it computes on (each also sees, and the driver
    # checkpoints, the other one), and after the restore it is there again
    for pid, where in done["before"].items():
        assert set(done["cuda"]["processComputeGpus"][pid]) == set(where["nvidiaSmi"]), done
        assert set(done["cuda"]["processGpus"][pid]) == {g.uuid for g in gpus}, done
        assert done["after"][pid]["nvidiaSmi"] == where["nvidiaSmi"], done
    assert done["before"][str(worker.pid)]["nvidiaSmi"] != done["before"][str(worker.child_pid)]["nvidiaSmi"]


def test_a_worker_is_restored_onto_another_gpu(
    gpus: list[cuda_devices.Gpu],
    start_multi: Callable[[int, int], MultiWorker],
    bundle: criu.CriuBundle,
    tmp_path: Path,
) -> None:
    worker = start_multi(0, 0)  # both processes on one GPU; the restore is given only the other one
    (source,) = {uuid for where in seen(worker).values() for uuid in where["nvidiaSmi"]}
    target = next(g.uuid for g in gpus if g.uuid != source)
    done = roundtrip(worker, bundle, tmp_path, "moved", DriverCuda(restore_onto=[target]))
    # the driver gets a pair for every GPU it checkpointed: the used one moves, the seen one takes its place
    assert sorted(done["pairs"]) == sorted([(source, target), (target, source)])
    assert {pid: where["nvidiaSmi"] for pid, where in done["after"].items()} == {
        str(worker.pid): [target],
        str(worker.child_pid): [target],
    }
