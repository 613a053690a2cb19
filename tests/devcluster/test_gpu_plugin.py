"""The local node's GPU device plugin: what it hands a container (pure), and, on a real kubelet with fake
GPU device nodes (character devices with /dev/null's numbers), that the node offers ``nvidia.com/gpu`` and a
pod that asks for one runs with its device node, the control nodes and the plugin's environment."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.devcluster import gpu_plugin
from dynamo_snapshot.devcluster.gpu_plugin import Inventory, allocation, discover


def _fake_root(tmp_path: Path, gpus: int) -> Path:
    dev = tmp_path / "root" / "dev"
    dev.mkdir(parents=True)
    null = os.stat("/dev/null").st_rdev
    for name in [f"nvidia{i}" for i in range(gpus)] + ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]:
        if os.geteuid() == 0:
            os.mknod(dev / name, 0o666 | 0o020000, null)
        else:
            (dev / name).touch()
    (dev / "nvidia-caps").mkdir()  # a directory, not a GPU
    return tmp_path / "root"


def test_discover_finds_the_gpus_in_order_and_the_control_nodes(tmp_path: Path):
    root = _fake_root(tmp_path, 11)
    inventory = discover(root, libraries=(), tools=())
    assert list(inventory.gpus) == [f"nvidia{i}" for i in range(11)]
    assert [Path(p).name for p in inventory.control] == ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]


def test_a_container_gets_its_gpu_the_control_nodes_and_the_driver_files_read_only_under_usr_local_nvidia():
    inventory = Inventory({"nvidia0": "/dev/nvidia0", "nvidia1": "/dev/nvidia1"}, ("/dev/nvidiactl",),
                          libraries=("/usr/lib/x86_64-linux-gnu/libcuda.so.1",), tools=("/usr/bin/nvidia-smi",))
    share = allocation(inventory, ["nvidia1"])
    assert share["devices"] == [("/dev/nvidia1", "/dev/nvidia1", "rw"), ("/dev/nvidiactl", "/dev/nvidiactl", "rw")]
    assert share["mounts"] == [("/usr/local/nvidia/lib64/libcuda.so.1", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
                               ("/usr/local/nvidia/bin/nvidia-smi", "/usr/bin/nvidia-smi")]
    assert share["envs"]["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"
    assert share["envs"]["PATH"].startswith("/usr/local/nvidia/bin:")
    assert share["envs"]["NVIDIA_VISIBLE_DEVICES"] == "nvidia1"


def test_an_unknown_device_id_is_refused_naming_the_node_s_gpus():
    with pytest.raises(KeyError, match=r"nvidia7.*nvidia0"):
        allocation(Inventory({"nvidia0": "/dev/nvidia0"}, ()), ["nvidia7"])


def test_a_shared_gpu_is_offered_as_replicas_and_each_share_gets_that_one_gpu():
    inventory = Inventory({"nvidia0": "/dev/nvidia0", "nvidia1": "/dev/nvidia1"}, ("/dev/nvidiactl",), replicas=3)
    assert inventory.device_ids() == [f"nvidia{g}::{i}" for g in (0, 1) for i in range(3)]
    share = allocation(inventory, ["nvidia1::2"])
    assert [d[0] for d in share["devices"]] == ["/dev/nvidia1", "/dev/nvidiactl"]
    assert share["envs"]["NVIDIA_VISIBLE_DEVICES"] == "nvidia1"
    two_shares = allocation(inventory, ["nvidia0::0", "nvidia0::1"])  # one GPU's node once
    assert [d[0] for d in two_shares["devices"]] == ["/dev/nvidia0", "/dev/nvidiactl"]


def test_a_share_the_node_never_offered_is_refused():
    shared = Inventory({"nvidia0": "/dev/nvidia0"}, (), replicas=2)
    for device_id in ("nvidia0", "nvidia0::2", "nvidia0::x"):
        with pytest.raises(KeyError, match="nvidia0::0"):
            allocation(shared, [device_id])
    with pytest.raises(KeyError):
        allocation(Inventory({"nvidia0": "/dev/nvidia0"}, ()), ["nvidia0::0"])


def test_the_driver_libraries_are_recognised_by_name():
    names = ["libcuda.so.1", "libcuda.so", "libnvidia-ml.so.1", "libnvidia-ptxjitcompiler.so.580.159.04",
             "libcudart.so.13", "libnvrtc.so.13", "libnvidia.so.x"]
    assert [n for n in names if gpu_plugin.DRIVER_LIBRARY.match(n)] == names[:4]


@pytest.mark.e2e
def _gpu_capacity(cluster, node: str) -> str:
    status = json.loads(cluster.kubectl("get", "node", node, "-o", "json"))["status"]
    return status.get("capacity", {}).get("nvidia.com/gpu", "0")


def _other_kubelets(cluster) -> list[int]:
    """PIDs of kubelets on this machine other than the cluster's own."""
    ours = cluster._components["kubelet"].process.pid
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != ours:
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if argv0.endswith(b"/kubelet"):
                found.append(int(proc.name))
    return found


def test_a_pod_asking_for_nvidia_com_gpu_runs_with_its_device_node_on_a_real_kubelet(tmp_path: Path):
    from dynamo_snapshot.devcluster import images
    from dynamo_snapshot.devcluster import node as node_module
    from dynamo_snapshot.devcluster.cluster import LocalCluster
    from dynamo_snapshot.devcluster.node import KubeletNode

    reason = node_module.missing() or images.base_layer_missing()
    if reason:
        pytest.skip(f"needs a real node: {reason}")
    tmp_path = Path(tempfile.mkdtemp(prefix="gpu-", dir="/tmp"))  # containerd's socket paths must stay short
    root = _fake_root(tmp_path, 2)
    cluster = LocalCluster(tmp_path / "cluster").start()
    try:
        archives = images.build(tmp_path / "images")
        node = KubeletNode(cluster, gpu_plugin=[f"--root={root}", "--no-driver-files"])
        with node.running(archives):
            # registered, the resource can read 0 until the plugin's first device list is in: wait for it
            deadline = time.monotonic() + 60
            while (capacity := _gpu_capacity(cluster, node.name)) == "0" and time.monotonic() < deadline:
                time.sleep(0.5)
            if capacity == "0" and _other_kubelets(cluster):
                # the kubelet's device-plugin directory is fixed: a kubelet started after ours took it
                pytest.skip("another kubelet on this machine took /var/lib/kubelet/device-plugins")
            assert capacity == "2"
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "gpu", "namespace": "default"},
                   "spec": {"restartPolicy": "Never", "containers": [{
                       "name": "main", "image": images.PLACEHOLDER_IMAGE, "imagePullPolicy": "IfNotPresent",
                       "command": ["/bin/sh", "-c", "ls /dev | grep nvidia; echo visible=$NVIDIA_VISIBLE_DEVICES"],
                       "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
            cluster.kubectl("wait", "pod/gpu", "-n", "default", "--for=jsonpath={.status.phase}=Succeeded",
                            "--timeout=120s")
            lines = cluster.kubectl("logs", "gpu", "-n", "default").split()
            gpus = [n for n in lines if n in ("nvidia0", "nvidia1")]
            assert len(gpus) == 1, lines
            assert {"nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"} <= set(lines)
            assert f"visible={gpus[0]}" in lines
            too_many = {**pod, "metadata": {"name": "three", "namespace": "default"}}
            too_many["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "3"}}
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(too_many))
            cluster.kubectl("wait", "pod/three", "-n", "default", "--for=condition=PodScheduled=false",
                            "--timeout=60s")
            # the kubelet restarts: the plugin registers again and the node keeps offering its GPUs
            cluster.restart_component("kubelet")
            deadline = time.monotonic() + 60
            while True:
                status = json.loads(cluster.kubectl("get", "node", node.name, "-o", "json"))["status"]
                registrations = (cluster.root / "logs" / "gpu-plugin.log").read_text().count("registered")
                if registrations >= 2 and status.get("allocatable", {}).get("nvidia.com/gpu") == "2":
                    break
                assert time.monotonic() < deadline, "the node lost nvidia.com/gpu after a kubelet restart"
                time.sleep(1)
    finally:
        cluster.stop()
        shutil.rmtree(tmp_path, ignore_errors=True)
