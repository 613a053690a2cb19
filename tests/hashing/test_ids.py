"""The identifiers of SPEC section 3, against the SPEC's vectors and hand-checked edge cases."""

import pytest

from dynamo_snapshot.api import Identity, Service, convert
from dynamo_snapshot.hashing import (
    dgd_checkpoint_id,
    identity_hash,
    identity_hash_input,
    worker_hash,
    worker_hash_input,
)

LLAMA = {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"}


def test_spec_identity_vector_bytes_and_hash():
    assert identity_hash_input(LLAMA) == (
        b'{"model":"meta-llama/Llama-2-7b-hf","backendFramework":"vllm",'
        b'"tensorParallelSize":1,"pipelineParallelSize":1}'
    )
    assert identity_hash(LLAMA) == "96429b2725761a09"


def test_identity_struct_and_dict_hash_alike():
    assert identity_hash(convert(LLAMA, Identity)) == identity_hash(LLAMA)


def test_zero_parallel_sizes_mean_one():
    assert identity_hash({**LLAMA, "tensorParallelSize": 0, "pipelineParallelSize": 0}) == "96429b2725761a09"
    assert identity_hash({**LLAMA, "tensorParallelSize": 1}) == "96429b2725761a09"
    assert identity_hash({**LLAMA, "tensorParallelSize": 2}) != "96429b2725761a09"


@pytest.mark.parametrize("field", ["dynamoVersion", "dtype", "extraParameters", "maxModelLen"])
def test_empty_optional_fields_are_omitted(field):
    empty = {"dynamoVersion": "", "dtype": "", "extraParameters": {}, "maxModelLen": 0}[field]
    assert identity_hash({**LLAMA, field: empty}) == identity_hash(LLAMA)


def test_optional_fields_in_spec_order():
    ident = {
        "extraParameters": {"b": "2", "a": "1"},
        "maxModelLen": 4096,
        "dtype": "bfloat16",
        "pipelineParallelSize": 2,
        "tensorParallelSize": 4,
        "dynamoVersion": "0.5.0",
        "backendFramework": "sglang",
        "model": "m",
    }
    assert identity_hash_input(ident) == (
        b'{"model":"m","backendFramework":"sglang","dynamoVersion":"0.5.0","tensorParallelSize":4,'
        b'"pipelineParallelSize":2,"dtype":"bfloat16","maxModelLen":4096,"extraParameters":{"a":"1","b":"2"}}'
    )


def test_extra_parameters_key_order_does_not_matter():
    one = {**LLAMA, "extraParameters": {"z": "1", "a": "2", "é": "3", "B": "4"}}
    two = {**LLAMA, "extraParameters": {"B": "4", "é": "3", "a": "2", "z": "1"}}
    assert identity_hash(one) == identity_hash(two)
    # Sorted bytewise: uppercase before lowercase, multi-byte UTF-8 last.
    assert b'"extraParameters":{"B":"4","a":"2","z":"1","\xc3\xa9":"3"}' in identity_hash_input(one)


def test_html_and_line_separator_escaping():
    data = identity_hash_input({**LLAMA, "model": "a<b>&c\u2028d\u2029e/f"})
    assert b'"model":"a\\u003cb\\u003e\\u0026c\\u2028d\\u2029e/f"' in data


def test_non_ascii_is_raw_utf8():
    data = identity_hash_input({**LLAMA, "model": "модель-日本-🚀"})
    assert '"model":"модель-日本-🚀"'.encode() in data


def test_fields_outside_identity_do_not_matter():
    # Only the identity is an input: callers cannot even pass the image or resources.
    assert identity_hash({**LLAMA}) == identity_hash(dict(LLAMA))


def test_spec_dgd_checkpoint_id_vector():
    assert dgd_checkpoint_id("ns", "dgd", "uid-1", "worker", "hash-1") == "197725d87a037228bc935cbbfe6158a8"


def test_dgd_checkpoint_id_differs_per_dgd_uid_and_generation():
    base = dgd_checkpoint_id("ns", "dgd", "uid-1", "worker", "hash-1")
    assert dgd_checkpoint_id("ns", "dgd", "uid-2", "worker", "hash-1") != base
    assert dgd_checkpoint_id("ns", "dgd", "uid-1", "worker", "hash-2") != base
    assert dgd_checkpoint_id("ns", "dgd", "uid-1", "decode", "hash-1") != base
    assert len(base) == 32


SERVICE = {
    "componentType": "worker",
    "replicas": 2,
    "envs": [{"name": "A", "value": "1"}],
    "extraPodSpec": {"mainContainer": {"image": "vllm:placeholder", "args": ["--model", "m"]}},
    "checkpoint": {"enabled": True, "startupPolicy": "Immediate"},
}


def test_worker_hash_input_shape():
    data = worker_hash_input("VllmDecodeWorker", SERVICE, [{"name": "G", "value": "x"}])
    assert data == (
        b'{"version":"worker-v1","component":"VllmDecodeWorker","service":{"componentType":"worker",'
        b'"envs":[{"name":"A","value":"1"}],"extraPodSpec":{"mainContainer":{"args":["--model","m"],'
        b'"image":"vllm:placeholder"}}},"graphEnvs":[{"name":"G","value":"x"}]}'
    )
    assert len(worker_hash("VllmDecodeWorker", SERVICE, [])) == 8


def test_replicas_and_checkpoint_settings_never_change_worker_hash():
    base = worker_hash("w", SERVICE, [])
    changed = {**SERVICE, "replicas": 7, "checkpoint": {"enabled": False, "startupPolicy": "WaitForCheckpoint"}}
    assert worker_hash("w", changed, []) == base
    assert worker_hash("w", {k: v for k, v in SERVICE.items() if k not in ("replicas", "checkpoint")}, []) == base


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["extraPodSpec"]["mainContainer"].update(image="vllm:other"),
        lambda s: s["extraPodSpec"]["mainContainer"].update(args=["--model", "other"]),
        lambda s: s["envs"].append({"name": "B", "value": "2"}),
        lambda s: s.update(resources={"limits": {"nvidia.com/gpu": "1"}}),
    ],
)
def test_what_runs_in_the_container_changes_worker_hash(change):
    import copy

    service = copy.deepcopy(SERVICE)
    change(service)
    assert worker_hash("w", service, []) != worker_hash("w", SERVICE, [])


def test_graph_envs_and_component_name_change_worker_hash():
    assert worker_hash("w", SERVICE, [{"name": "G", "value": "1"}]) != worker_hash("w", SERVICE, [])
    assert worker_hash("other", SERVICE, []) != worker_hash("w", SERVICE, [])


def test_empty_and_absent_fields_hash_alike():
    assert worker_hash("w", {**SERVICE, "envs": []}, None) == worker_hash(
        "w", {k: v for k, v in SERVICE.items() if k != "envs"}, []
    )
    assert worker_hash("w", {**SERVICE, "resources": {}}, []) == worker_hash("w", SERVICE, [])
    # but zero is a value: runAsUser 0 (root) is not "unset"
    with_zero = {**SERVICE, "extraPodSpec": {"securityContext": {"runAsUser": 0}}}
    without = {**SERVICE, "extraPodSpec": {"securityContext": {}}}
    assert worker_hash("w", with_zero, []) != worker_hash("w", without, [])


def test_worker_hash_of_struct_matches_dict():
    service = {k: v for k, v in SERVICE.items() if k != "checkpoint"}
    assert worker_hash("w", convert(service, Service), []) == worker_hash("w", service, [])
