"""The DGD informer holds api structs, and the worker hash (which names a component's ReplicaSets) is still
taken over the service exactly as stored: the same hash, byte for byte, as when the informer held dicts.

PINNED were computed with the dict-holding informer's code path (commit 69abac3: `worker_hash` over
`dgd["spec"]["services"][component]` and `dgd["spec"]["envs"]` of the stored dict). A change to any of them
renames ReplicaSets: a rollout of every DGD on upgrade."""

from __future__ import annotations

import copy

import msgspec
import pytest

from dynamo_snapshot.api import DynamoGraphDeployment, convert, decode_dgd
from dynamo_snapshot.controllers.dgd.plan import plan_component
from dynamo_snapshot.hashing import worker_hash
from tests.controllers.support import agent_daemonset, enabled_config, eventually


def _dgd(name: str, uid: str, spec: dict) -> dict:
    return {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "5", "generation": 1},
            "spec": spec}


STORED = {
    "plain": _dgd("plain", "u-1", {"backendFramework": "vllm", "services": {"Worker": {
        "componentType": "worker", "replicas": 2,
        "extraPodSpec": {"mainContainer": {"image": "vllm:1", "args": ["--model", "m"]}}}}}),
    # upstream's disaggregated shape: fields this project does not model (dynamoNamespace, subComponentType,
    # sharedMemory), graph envs, resource aliases, a toleration, and checkpointing (not a hash input)
    "upstream": _dgd("disagg", "u-2", {"backendFramework": "vllm", "envs": [{"name": "HF_HOME", "value": "/cache"}],
                                       "services": {
        "Frontend": {"componentType": "frontend", "dynamoNamespace": "vllm-disagg", "replicas": 1,
                     "extraPodSpec": {"mainContainer": {"image": "dynamo:1",
                                                        "command": ["python3", "-m", "dynamo.frontend"]}}},
        "VllmDecodeWorker": {
            "componentType": "worker", "subComponentType": "decode", "dynamoNamespace": "vllm-disagg",
            "replicas": 2, "envs": [{"name": "A", "value": "1"}], "resources": {"limits": {"gpu": "1"}},
            "sharedMemory": {"size": "16Gi"}, "extraPodMetadata": {"labels": {"team": "x"}},
            "extraPodSpec": {"mainContainer": {"image": "vllm:1", "workingDir": "/w",
                                               "args": ["--model", "Qwen/Qwen3-0.6B", "--is-decode-worker"]},
                             "tolerations": [{"key": "gpu", "operator": "Exists"}]},
            "checkpoint": {"enabled": True, "mode": "Auto"}}}}),
    # numbers as JSON numbers, empty fields (absent for the hash), escaped and non-ASCII text, an
    # upstream field that is false
    "numbers": _dgd("numbers", "u-3", {"services": {"Worker": {
        "resources": {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"cpu": 2.5}},
        "envs": [], "extraPodMetadata": {},
        "extraPodSpec": {"securityContext": {"runAsUser": 0}, "mainContainer": {
            "image": "img:é<&>", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}},
        "scalingAdapter": {"enabled": False}}}}),
}

PINNED = {
    ("plain", "Worker"): "8602072c",
    ("upstream", "Frontend"): "a3c5a0fa",
    ("upstream", "VllmDecodeWorker"): "9484accd",
    ("numbers", "Worker"): "6e7c1f05",
}


def _planned_hash(stored: dict, component: str) -> str:
    """The new path: the JSON the API server sends, decoded as the DGD informer does, planned."""
    dgd = decode_dgd(msgspec.json.encode(stored))
    plan = plan_component(dgd, component, dgd.spec.services[component], get_checkpoint=lambda _: None,
                          storage=None)
    assert plan.replicaset_name == f"{dgd.metadata.name}-{component}-{plan.worker_hash}".lower()
    return plan.worker_hash


def _dict_path_hash(stored: dict, component: str) -> str:
    """The old path: the stored dict's service and graph envs, as the dict-holding informer hashed them."""
    return worker_hash(component, stored["spec"]["services"][component], stored["spec"].get("envs") or [])


@pytest.mark.parametrize(("name", "component"), sorted(PINNED))
def test_the_worker_hash_of_a_stored_dgd_is_what_it_was_when_the_informer_held_dicts(name, component):
    stored = STORED[name]
    assert _planned_hash(stored, component) == PINNED[name, component]
    assert _dict_path_hash(stored, component) == PINNED[name, component]


def test_hashing_the_struct_would_rename_the_replicasets_of_dgds_with_upstream_fields():
    """Why the informer keeps the services as stored: the struct drops what it does not model."""
    for name, component in [("upstream", "Frontend"), ("upstream", "VllmDecodeWorker"), ("numbers", "Worker")]:
        stored = STORED[name]
        service = convert(stored, DynamoGraphDeployment).spec.services[component]
        assert worker_hash(component, service, stored["spec"].get("envs")) != PINNED[name, component]


def test_the_decoded_struct_keeps_upstream_fields_for_the_hash_only():
    dgd = decode_dgd(msgspec.json.encode(STORED["upstream"]))
    assert dgd.stored_spec.service("VllmDecodeWorker")["subComponentType"] == "decode"
    assert dgd.stored_spec.graph_envs() == [{"name": "HF_HOME", "value": "/cache"}]
    assert b"subComponentType" not in msgspec.json.encode(dgd)  # never written back


def test_a_dgd_not_decoded_from_its_json_cannot_be_hashed_by_accident():
    dgd = convert(STORED["upstream"], DynamoGraphDeployment)
    with pytest.raises(AttributeError, match=r"ns/disagg: no stored spec; decode it .* api\.decode_dgd"):
        plan_component(dgd, "Frontend", dgd.spec.services["Frontend"], get_checkpoint=lambda _: None, storage=None)


@pytest.mark.integration
def test_the_operator_names_replicasets_of_a_dgd_with_upstream_fields_by_the_pinned_hash(cluster, start_operator):
    cluster.apply(agent_daemonset())
    start_operator(enabled_config())
    manifest = copy.deepcopy(STORED["upstream"])
    manifest["metadata"] = {"name": "disagg"}
    cluster.apply(manifest)
    stored = cluster.get("dgd", "disagg")
    assert stored["spec"]["services"]["VllmDecodeWorker"]["subComponentType"] == "decode"  # kept by the schema
    wanted = {f"disagg-{component.lower()}-{PINNED['upstream', component]}"
              for component in ("Frontend", "VllmDecodeWorker")}
    assert {f"disagg-{c.lower()}-{_dict_path_hash(stored, c)}" for c in ("Frontend", "VllmDecodeWorker")} == wanted

    def named() -> bool:
        return wanted <= {rs["metadata"]["name"] for rs in cluster.list("replicasets")}

    eventually(named, timeout=60, what=f"ReplicaSets {sorted(wanted)}")
