"""The installed stack's choices per storage mode (devcluster/installed.py), without a cluster: which
namespace the snapshot chart goes to and what each chart's values say."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dynamo_snapshot.devcluster import installed
from dynamo_snapshot.devcluster.stack import SnapshotStack


def fake_stack(mode: str) -> SimpleNamespace:
    node = SimpleNamespace(cri_socket=Path("/run/node/containerd.sock"), kubelet_root=Path("/var/lib/node-kubelet"))
    return SimpleNamespace(storage_mode=mode, namespace="e2e", node=node)


def test_the_installed_stack_refuses_s3_naming_the_modes_it_runs(tmp_path):
    with pytest.raises(ValueError, match="agentMount or podMount mode, not s3"):
        SnapshotStack(tmp_path, storage_mode="s3", installed=True)
    assert SnapshotStack(tmp_path, storage_mode="podMount", installed=True).installed


def test_agent_mount_installs_the_agent_in_the_workload_namespace_with_the_charts_pvc():
    stack = fake_stack("agentMount")
    assert installed.agent_namespace(stack) == "e2e"
    assert "accessMode" not in installed.snapshot_values(stack)["storage"]
    assert "admissionPolicy" not in installed.snapshot_values(stack)
    assert "storage" not in installed.operator_values(stack)["checkpoint"]


def test_pod_mount_installs_one_agent_in_its_own_namespace_under_the_required_policy_and_the_operator_owns_the_pvc():
    stack = fake_stack("podMount")
    assert installed.agent_namespace(stack) == installed.AGENT_NAMESPACE != "e2e"
    values = installed.snapshot_values(stack)
    assert values["storage"] == {"accessMode": "podMount", "pvc": {"basePath": installed.POD_BASE_PATH}}
    assert values["admissionPolicy"] == {"checkpointObjectsOnly": True}  # fails the install where it cannot apply
    assert "rbac" not in values  # the chart's default in podMount: a ClusterRole
    storage = installed.operator_values(stack)["checkpoint"]["storage"]
    assert storage["accessMode"] == "podMount" and storage["pvc"]["create"] is True
    assert storage["pvc"]["pvcName"] == installed.PVC_NAME and storage["pvc"]["basePath"] == installed.POD_BASE_PATH
