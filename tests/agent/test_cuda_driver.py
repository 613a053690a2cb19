"""The driver layer where no GPU is needed: the refusal on a node without the CUDA checkpoint API,
GPU UUID handling, and the restore arguments built with the real cuda-bindings structs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_snapshot.agent.cuda import step as cuda
from dynamo_snapshot.agent.cuda.driver import CudaUnavailable, gpu_pair_structs, load_driver, uuid_bytes

OLD = "GPU-5b6e1f3c-9a0d-4c1e-8f2a-0123456789ab"
NEW = "GPU-00112233-4455-6677-8899-aabbccddeeff"


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="this machine has an NVIDIA driver")
def test_a_node_without_the_api_is_refused_naming_both_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("DYN_SNAPSHOT_CUDA_CHECKPOINT", raising=False)
    with pytest.raises(CudaUnavailable, match=r"no CUDA checkpoint API on this node: .*; no cuda-checkpoint binary"):
        load_driver()


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="this machine has an NVIDIA driver")
def test_without_a_driver_the_agent_uses_no_cuda() -> None:
    assert isinstance(cuda.default_step(), cuda.NoCuda)


def test_gpu_uuids_convert_to_the_drivers_bytes() -> None:
    assert uuid_bytes(OLD).hex() == "5b6e1f3c9a0d4c1e8f2a0123456789ab"
    assert uuid_bytes("MIG-" + OLD[4:]) == uuid_bytes(OLD)
    with pytest.raises(ValueError, match="is not a GPU UUID"):
        uuid_bytes("GPU-zz")


def test_restore_pairs_carry_both_uuids() -> None:
    driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-bindings not installed (the gpu extra)")
    (pair,) = gpu_pair_structs(driver, [(OLD, NEW)])
    assert pair.oldUuid.bytes == uuid_bytes(OLD)
    assert pair.newUuid.bytes == uuid_bytes(NEW)
    args = driver.CUcheckpointRestoreArgs()
    args.gpuPairs = [pair]
    args.gpuPairsCount = 1
    assert args.gpuPairs[0].newUuid.bytes == uuid_bytes(NEW)
