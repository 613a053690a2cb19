"""What the agent reads from /proc about NVIDIA devices (no GPU needed): device mappings and open
device files of a process, the driver's GPU inventory, and the GPU remapping plan of a restore."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.devices import Gpu, GpuMismatch
from dynamo_snapshot.agent.host import procfs

# A compile-pool child forked from a CUDA process: NVIDIA device mappings, no CUDA context of its own.
HELPER_MAPS = """\
55d7c5a00000-55d7c5a01000 r--p 00000000 fd:01 1048602                    /usr/bin/python3.12
7f3a40000000-7f3a40200000 rw-s 00000000 00:06 1030                       /dev/nvidiactl
7f3a40200000-7f3a40400000 rw-s 00000000 00:06 1031                       /dev/nvidia0
7f3a40400000-7f3a40600000 rw-s 00000000 00:06 1031                       /dev/nvidia0
7f3a40600000-7f3a40800000 rw-s 00000000 00:06 1044                       /dev/nvidia-uvm (deleted)
7f3a41000000-7f3a41200000 rw-p 00000000 00:00 0
7f3a42000000-7f3a42010000 r--p 00000000 fd:01 2000                       /opt/my dir/libnvidia-ml.so.1
7ffd1c5e0000-7ffd1c601000 rw-p 00000000 00:00 0                          [stack]
"""

INFORMATION = """\
Model: \t\t NVIDIA H200
IRQ:   \t\t 42
GPU UUID: \t GPU-5b6e1f3c-9a0d-4c1e-8f2a-0123456789ab
Video BIOS: \t 96.00.af.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:00:05.0
Device Minor: \t 0
GPU Excluded:\t No
"""

VERSION = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  "
    "Thu Oct  2 10:00:00 UTC 2025\nGCC version:  gcc version 12.3.0\n"
)


def test_device_mappings_are_found_in_maps() -> None:
    assert cuda_devices.parse_maps_devices(HELPER_MAPS) == ("/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl")


def test_a_process_without_nvidia_devices_has_none() -> None:
    plain = "7ffd1c5e0000-7ffd1c601000 rw-p 00000000 00:00 0                          [stack]\n"
    assert cuda_devices.parse_maps_devices(plain) == ()


@pytest.fixture
def fake_proc(tmp_path: Path) -> Iterator[Path]:
    with procfs.configured(tmp_path):
        yield tmp_path


def make_process(proc: Path, pid: int, maps: str, fds: dict[int, str]) -> None:
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "maps").write_text(maps)
    for fd, target in fds.items():
        os.symlink(target, proc / str(pid) / "fd" / str(fd))


def test_usage_combines_mappings_and_open_device_files(fake_proc: Path) -> None:
    make_process(fake_proc, 4321, HELPER_MAPS, {0: "/dev/null", 7: "/dev/nvidia1", 8: "/dev/nvidiactl"})
    usage = cuda_devices.nvidia_usage(4321)
    assert usage.any
    assert usage.open_files == ("/dev/nvidia1", "/dev/nvidiactl")
    assert usage.gpu_minors == (0, 1)
    assert "maps /dev/nvidia-uvm, /dev/nvidia0, /dev/nvidiactl" in usage.describe()


def test_usage_of_a_process_that_is_gone_is_empty(fake_proc: Path) -> None:
    assert not cuda_devices.nvidia_usage(999999).any


def test_gpu_inventory_and_driver_version_come_from_the_driver_procfs(tmp_path: Path) -> None:
    gpu_dir = tmp_path / "gpus" / "0000:00:05.0"
    gpu_dir.mkdir(parents=True)
    (gpu_dir / "information").write_text(INFORMATION)
    (tmp_path / "version").write_text(VERSION)
    assert cuda_devices.gpus(tmp_path) == [
        Gpu(uuid="GPU-5b6e1f3c-9a0d-4c1e-8f2a-0123456789ab", model="NVIDIA H200", minor=0, bus="0000:00:05.0")
    ]
    assert cuda_devices.driver_version(tmp_path) == "580.159.04"
    assert cuda_devices.gpus(tmp_path / "absent") == []
    assert cuda_devices.driver_version(tmp_path / "absent") is None


H200_A = Gpu("GPU-aaaaaaaa-0000-0000-0000-000000000000", "NVIDIA H200", 0)
H200_B = Gpu("GPU-bbbbbbbb-0000-0000-0000-000000000000", "NVIDIA H200", 1)
H200_C = Gpu("GPU-cccccccc-0000-0000-0000-000000000000", "NVIDIA H200", 2)
H100_D = Gpu("GPU-dddddddd-0000-0000-0000-000000000000", "NVIDIA H100 80GB HBM3", 3)


def test_no_remap_when_the_checkpointed_gpus_are_there() -> None:
    assert cuda_devices.plan_gpu_pairs([H200_B], [H200_A, H200_B]) == []


def test_a_different_gpu_of_the_same_model_is_remapped_and_every_gpu_is_listed() -> None:
    pairs = cuda_devices.plan_gpu_pairs([H200_A, H200_B], [H200_B, H200_C])
    assert pairs == [(H200_A.uuid, H200_C.uuid), (H200_B.uuid, H200_B.uuid)]


def test_another_model_or_too_few_gpus_is_refused() -> None:
    with pytest.raises(GpuMismatch, match=r"NVIDIA H200 \(GPU-aaaaaaaa.*it has NVIDIA H100 80GB HBM3"):
        cuda_devices.plan_gpu_pairs([H200_A], [H100_D])
    with pytest.raises(GpuMismatch, match="GPU-bbbbbbbb"):
        cuda_devices.plan_gpu_pairs([H200_A, H200_B], [H200_C])


def test_a_gpu_only_seen_needs_a_visible_gpu_not_a_target_one() -> None:
    # computing on A, B only visible; restored with only C as its GPU but A, B, C visible (a host tree)
    pairs = cuda_devices.plan_gpu_pairs([H200_A, H200_B], [H200_C], {H200_A.uuid}, [H200_A, H200_B, H200_C])
    assert pairs == [(H200_A.uuid, H200_C.uuid), (H200_B.uuid, H200_B.uuid)]
    # in a container that sees only C, the idle GPU has nowhere to go
    with pytest.raises(GpuMismatch, match="GPU-bbbbbbbb"):
        cuda_devices.plan_gpu_pairs([H200_A, H200_B], [H200_C], {H200_A.uuid})


def test_computing_gpus_already_in_the_target_do_not_move() -> None:
    assert cuda_devices.plan_gpu_pairs([H200_A, H200_B], [H200_B], {H200_B.uuid}, [H200_A, H200_B]) == []
