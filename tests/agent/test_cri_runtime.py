"""The CRI client against a real containerd: container -> host PID, OCI spec, sandbox."""

from __future__ import annotations

import pytest

from dynamo_snapshot.agent.container.runtime import ContainerNotFound, RuntimeType, default_socket
from dynamo_snapshot.agent.host import procfs
from tests.agent import node_harness as harness


def test_default_sockets_follow_the_runtime_type() -> None:
    assert default_socket("containerd") == "/run/containerd/containerd.sock"
    assert default_socket(RuntimeType.CRIO) == "/var/run/crio/crio.sock"
    with pytest.raises(ValueError, match="unknown container runtime type 'docker'"):
        default_socket("docker")


@pytest.mark.containers
def test_container_info_names_the_host_pid_spec_and_sandbox(node: harness.Node, pods: harness.Pods) -> None:
    workload = pods.placeholder()
    info = node.info(workload.container_id)

    assert info.running
    assert info.sandbox_id == workload.pod.sandbox_id
    assert info.name == "main"
    # The host PID is the container's init: PID 1 in its own namespace, running snapshot-init.
    assert procfs.ns_pid(info.pid) == 1
    assert "snapshot-init" in (procfs.proc(info.pid) / "cmdline").read_text()
    # The OCI spec is the runtime's, with the environment and mounts the container was created with.
    assert info.env["DYN_SNAPSHOT_RESTORE_STANDBY"] == "1"
    assert "/snapshot-control" in {m["destination"] for m in info.spec["mounts"]}


@pytest.mark.containers
def test_unknown_container_is_reported_by_id(node: harness.Node) -> None:
    with pytest.raises(ContainerNotFound, match="container 0123456789ab"):
        node.info("0123456789ab")
