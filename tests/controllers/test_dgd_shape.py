"""A DGD in either served version's shape, as `api.decode_dgd` gives it to the operator: the services it
means, the version its writes go through (the shape's: with conversion None the API server stamps the
version it was read through), and what is refused named where the user wrote it. On the real API server
in tests/compat/test_dgd_versions.py."""

from __future__ import annotations

import msgspec
import pytest

from dynamo_snapshot.api import (
    DynamoGraphDeployment,
    Malformed,
    Refused,
    as_services_shape,
    decode_dgd,
    malformed_dgd,
)
from dynamo_snapshot.hashing import worker_hash
from dynamo_snapshot.kube import DYNAMO_GRAPH_DEPLOYMENTS

META = {"name": "graph", "namespace": "ns", "uid": "u-1", "resourceVersion": "3", "generation": 1}
MAIN = {"name": "main", "image": "placeholder:1", "args": ["--model", "m"]}


def beta(**experimental) -> dict:
    """A v1beta1 DGD as a list through v1alpha1 returns it: the version stamped, the shape as written."""
    return {"apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoGraphDeployment", "metadata": META,
            "spec": {"backendFramework": "vllm", "env": [{"name": "G", "value": "1"}], "components": [
                {"name": "Frontend", "type": "frontend"},
                {"name": "Worker", "type": "worker", "replicas": 2,
                 "podTemplate": {"spec": {"containers": [MAIN]}},
                 "experimental": {"checkpoint": {"mode": "Auto"}, **experimental}}]}}


def encode(obj: dict) -> bytes:
    return msgspec.json.encode(obj)


def endpoint(dgd) -> str:
    """Where the operator writes the DGD's status (controllers/dgd/reconciler.py)."""
    return DYNAMO_GRAPH_DEPLOYMENTS.at_version(dgd.api_version).path("ns", "graph", "status")


def test_a_v1beta1_dgd_listed_through_v1alpha1_is_written_back_through_v1beta1():
    dgd = decode_dgd(encode(beta()))
    assert dgd.api_version == "nvidia.com/v1beta1"
    assert endpoint(dgd) == "/apis/nvidia.com/v1beta1/namespaces/ns/dynamographdeployments/graph/status"


def test_a_v1alpha1_dgd_read_through_v1beta1_is_written_back_through_v1alpha1():
    alpha = {**as_services_shape(beta()), "apiVersion": "nvidia.com/v1beta1"}
    dgd = decode_dgd(encode(alpha))
    assert dgd.api_version == "nvidia.com/v1alpha1"
    assert endpoint(dgd) == "/apis/nvidia.com/v1alpha1/namespaces/ns/dynamographdeployments/graph/status"


def test_a_v1beta1_dgd_means_the_services_upstream_converts_it_to():
    dgd = decode_dgd(encode(beta()))
    worker = dgd.spec.services["Worker"]
    assert list(dgd.spec.services) == ["Frontend", "Worker"]
    assert worker.replicas == 2 and worker.component_type == "worker"
    assert worker.checkpoint.enabled and worker.checkpoint.target_container_name == "main"
    assert worker.extra_pod_spec["mainContainer"]["image"] == "placeholder:1"
    assert [e.name for e in dgd.spec.envs] == ["G"]


def test_a_v1beta1_dgd_and_its_v1alpha1_twin_have_the_same_worker_hash():
    alpha = decode_dgd(encode(as_services_shape(beta())))
    converted = decode_dgd(encode(beta()))
    hashes = {worker_hash("Worker", d.stored_spec.service("Worker"), d.stored_spec.graph_envs())
              for d in (alpha, converted)}
    assert len(hashes) == 1


@pytest.mark.parametrize("feature, path", [
    ("gpuMemoryService", "spec.components[1].experimental.gpuMemoryService"),
    ("failover", "spec.components[1].experimental.failover"),
])
def test_an_unsupported_v1beta1_feature_is_refused_where_it_was_written(feature, path):
    raw = encode(beta(**{feature: {"mode": "IntraPod"}}))
    with pytest.raises(Refused) as caught:
        decode_dgd(raw)
    stand_in = malformed_dgd(raw, caught.value)
    assert isinstance(stand_in, Malformed) and stand_in.path == path
    assert "is not supported by dynamo-snapshot (component Worker); remove it" in stand_in.problem
    assert endpoint(stand_in).startswith("/apis/nvidia.com/v1beta1/")  # its failed status: its own version


def test_an_unsupported_v1alpha1_feature_is_refused_naming_the_field_and_the_fix():
    alpha = as_services_shape(beta())
    alpha["spec"]["services"]["Worker"]["gpuMemoryService"] = {"enabled": True}
    raw = encode(alpha)
    with pytest.raises(Refused) as caught:
        decode_dgd(raw)
    stand_in = malformed_dgd(raw, caught.value)
    assert stand_in.path == "spec.services.Worker.gpuMemoryService.enabled"
    assert stand_in.problem.endswith("set it to false or remove gpuMemoryService")
    assert stand_in.api_version == "nvidia.com/v1alpha1"


def test_a_v1beta1_component_that_does_not_fit_is_named_by_its_place_in_the_list():
    obj = beta()
    obj["spec"]["components"][1]["replicas"] = -1
    raw = encode(obj)
    with pytest.raises(Refused) as caught:
        decode_dgd(raw)
    stand_in = malformed_dgd(raw, caught.value)
    assert stand_in.path == "spec.components[1].replicas" and stand_in.problem == "expected >= 0"


def test_a_v1alpha1_dgd_decodes_as_before():
    alpha = as_services_shape(beta())
    dgd = decode_dgd(encode(alpha))
    assert isinstance(dgd, DynamoGraphDeployment) and dgd.stored_spec.service("Worker") == \
        alpha["spec"]["services"]["Worker"]
