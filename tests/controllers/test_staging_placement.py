"""A Ready checkpoint is pre-staged only on nodes where a pod that restores from it can run (nodeSelector,
required node affinity, tolerated taints, allocatable GPUs, the checkpoint's GPU model and driver), a few
nodes at most, and the nodes chosen before stay chosen while they still fit."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.api import StagingGPU, names
from dynamo_snapshot.controllers.staging.placement import NodeView, choose_nodes, gpu_of, why_not


def node(name: str, labels: dict[str, str] | None = None, *, taints: list[dict] | None = None, gpus: int = 8,
         unschedulable: bool = False, ready: bool = True) -> NodeView:
    return NodeView.of({
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {"allocatable": {names.RESOURCE_GPU: str(gpus)},
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    })


def pod(**spec: Any) -> dict[str, Any]:
    return {"containers": [{"name": "main", "resources": {"limits": {names.RESOURCE_GPU: "1"}}}], **spec}


GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def test_a_node_selector_picks_only_the_nodes_with_its_labels():
    nodes = [node("a", {"pool": "h200"}), node("b", {"pool": "a100"}), node("c", {"pool": "h200"})]
    assert choose_nodes([pod(nodeSelector={"pool": "h200"})], nodes, limit=5) == ["a", "c"]
    assert why_not(nodes[1], pod(nodeSelector={"pool": "h200"})) == "nodeSelector pool=h200"


def test_a_taint_keeps_pods_off_unless_they_tolerate_it():
    tainted = node("gpu-1", taints=[GPU_TAINT])
    assert "taints not tolerated: nvidia.com/gpu=present:NoSchedule" == why_not(tainted, pod())
    assert why_not(tainted, pod(tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])) is None
    assert why_not(tainted, pod(tolerations=[{"key": "nvidia.com/gpu", "value": "present",
                                              "effect": "NoSchedule"}])) is None
    assert why_not(tainted, pod(tolerations=[{"key": "nvidia.com/gpu", "value": "other"}])) is not None
    assert why_not(tainted, pod(tolerations=[{"operator": "Exists"}])) is None  # tolerates everything
    soft = node("gpu-2", taints=[{**GPU_TAINT, "effect": "PreferNoSchedule"}])
    assert why_not(soft, pod()) is None, "PreferNoSchedule is the scheduler's preference, not a refusal"


def test_required_node_affinity_is_any_term_with_all_its_expressions():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1", "z2"]},
                              {"key": "spot", "operator": "DoesNotExist"}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
    ]}}}
    nodes = [node("a", {"zone": "z1"}), node("b", {"zone": "z1", "spot": "true"}), node("c", {"zone": "z3"}),
             node("special"), node("d", {"zone": "z2"})]
    assert choose_nodes([pod(affinity=affinity)], nodes, limit=9) == ["a", "d", "special"]
    gt = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gen", "operator": "Gt", "values": ["8"]}]}]}}}
    assert choose_nodes([pod(affinity=gt)], [node("old", {"gen": "8"}), node("new", {"gen": "9"})],
                        limit=3) == ["new"]


def test_cordoned_not_ready_and_gpu_less_nodes_are_not_chosen():
    nodes = [node("cordoned", unschedulable=True), node("down", ready=False), node("cpu", gpus=0), node("ok")]
    assert choose_nodes([pod()], nodes, limit=9) == ["ok"]
    assert why_not(nodes[2], pod()) == "1 x nvidia.com/gpu asked, not allocatable there"


def test_only_nodes_with_the_checkpoints_gpu_model_and_driver_are_chosen():
    source = node("src", {names.NODE_LABEL_GPU_PRODUCT: "NVIDIA-H200", names.NODE_LABEL_DRIVER_VERSION: "580.1.2"})
    gpu = gpu_of(source)
    assert gpu == StagingGPU(product="NVIDIA-H200", driver_version="580.1.2")
    nodes = [source,
             node("a100", {names.NODE_LABEL_GPU_PRODUCT: "NVIDIA-A100"}),
             node("old-driver", {names.NODE_LABEL_GPU_PRODUCT: "NVIDIA-H200",
                                 "nvidia.com/cuda.driver.major": "570", "nvidia.com/cuda.driver.minor": "1",
                                 "nvidia.com/cuda.driver.rev": "2"}),
             node("unlabelled")]  # no GPU feature discovery: the agent checks the manifest before fetching
    assert choose_nodes([pod()], nodes, limit=9, gpu=gpu) == ["src", "unlabelled"]
    assert why_not(nodes[2], pod(), gpu) == "driver 570.1.2, the checkpoint's is 580.1.2"
    assert gpu_of(node("plain")) is None


def test_the_choice_is_capped_and_keeps_the_nodes_chosen_before():
    nodes = [node(f"n{i}") for i in range(6)]
    assert choose_nodes([pod()], nodes, limit=3) == ["n0", "n1", "n2"]
    assert choose_nodes([pod()], nodes, limit=3, previous=["n5", "n4", "gone"]) == ["n0", "n4", "n5"]
    assert choose_nodes([pod()], nodes, limit=0) == []


def test_nothing_is_staged_for_a_checkpoint_nothing_restores_from():
    assert choose_nodes([], [node("a")], limit=3) == []


def test_a_node_fits_when_any_consumer_fits():
    nodes = [node("a", {"pool": "x"}), node("b", {"pool": "y"}), node("c", {"pool": "z"})]
    assert choose_nodes([pod(nodeSelector={"pool": "x"}), pod(nodeSelector={"pool": "z"})], nodes,
                        limit=5) == ["a", "c"]


def test_an_agents_staging_report_is_read_as_checkpoint_versions_and_a_garbled_one_as_nothing():
    from dynamo_snapshot.controllers.staging.controller import staged_versions

    def lease(annotation: str) -> dict:
        return {"metadata": {"annotations": {names.ANN_STAGED: annotation}}}

    assert staged_versions(lease('[{"checkpointID": "c1", "version": "1"}, {"checkpointID": "c2", "version": "3"}]')) \
        == {("c1", "1"), ("c2", "3")}
    for garbled in ("not json", '{"checkpointID": "c1"}', '[{"version": "1"}]', "[1]"):
        assert staged_versions(lease(garbled)) == set(), garbled
    assert staged_versions({"metadata": {}}) == set()


def test_the_staging_patch_names_every_field_so_nothing_of_the_old_staging_is_left():
    from dynamo_snapshot.api import Staging
    from dynamo_snapshot.controllers.staging.controller import staging_patch

    assert staging_patch(Staging(artifact_version="2", nodes=["a"])) == {
        "artifactVersion": "2", "nodes": ["a"], "staged": [], "gpu": None}
    assert staging_patch(None) is None
