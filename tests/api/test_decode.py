"""Decoding objects into the api structs: defaults, and errors that name the field and the fix."""

import copy
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.api import (
    DynamoCheckpoint,
    DynamoGraphDeployment,
    InvalidObject,
    Phase,
    StartupPolicy,
    StorageAccessMode,
    convert,
    parse_config,
    refuse_out_of_scope,
    to_dict,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINIMAL = {
    "metadata": {"name": "c", "namespace": "ns"},
    "spec": {
        "identity": {"model": "m", "backendFramework": "vllm"},
        "job": {"podTemplateSpec": {"spec": {"containers": [{"name": "main", "image": "i"}]}}},
    },
}


def _mutated(change):
    obj = copy.deepcopy(MINIMAL)
    change(obj)
    return obj


def test_spec_defaults():
    ckpt = convert(MINIMAL, DynamoCheckpoint)
    assert ckpt.spec.job.target_container_name == "main"
    assert ckpt.spec.job.active_deadline_seconds == 3600
    assert ckpt.spec.job.shared_memory == "8Gi"
    assert ckpt.spec.identity.tensor_parallel_size == 1
    assert ckpt.spec.identity.pipeline_parallel_size == 1
    assert ckpt.status.phase is None


def test_status_round_trips_in_wire_names():
    obj = {**MINIMAL, "status": {"phase": "Ready", "checkpointID": "abc", "identityHash": "abc",
                                 "createdAt": "2026-01-01T00:00:00Z", "observedGeneration": 2}}
    ckpt = convert(obj, DynamoCheckpoint)
    assert ckpt.status.phase is Phase.READY
    assert to_dict(ckpt)["status"] == obj["status"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o["spec"]["identity"].update(tensorParallelSize=0),
         "spec.identity.tensorParallelSize: expected >= 1"),
        (lambda o: o["spec"]["identity"].pop("model"), "spec.identity.model: required field is missing"),
        (lambda o: o["spec"]["identity"].update(backendFramework="tgi"),
         "spec.identity.backendFramework: invalid enum value 'tgi' (expected one of: sglang, trtllm, vllm)"),
        (lambda o: o["spec"]["job"].update(targetContainerName="Main"), "spec.job.targetContainerName: expected str"),
        (lambda o: o["spec"]["job"].pop("podTemplateSpec"), "spec.job.podTemplateSpec: required field is missing"),
        (lambda o: o["spec"]["job"].update(activeDeadlineSeconds=0), "spec.job.activeDeadlineSeconds: expected >= 1"),
    ],
)
def test_bad_checkpoint_names_the_field(change, message):
    with pytest.raises(InvalidObject) as err:
        convert(_mutated(change), DynamoCheckpoint)
    assert str(err.value).startswith(message)


def test_a_checkpoint_with_gpu_memory_service_enabled_is_refused_naming_the_field():
    # the checkpoint reconciler turns this refusal into phase Failed, reason InvalidCheckpoint, this message
    ckpt = convert(_mutated(lambda o: o["spec"].update(gpuMemoryService={"enabled": True})), DynamoCheckpoint)
    with pytest.raises(InvalidObject) as err:
        refuse_out_of_scope(ckpt.spec)
    assert str(err.value).startswith("spec.gpuMemoryService.enabled: GMS + Snapshot is not supported")
    assert "set it to false or remove spec.gpuMemoryService" in str(err.value)


@pytest.mark.parametrize("gms", [{"enabled": False}, {}, None], ids=["disabled", "empty", "absent"])
def test_a_checkpoint_with_gpu_memory_service_disabled_or_absent_is_accepted(gms):
    obj = _mutated(lambda o: o["spec"].update(gpuMemoryService=gms) if gms is not None else None)
    ckpt = convert(obj, DynamoCheckpoint)
    refuse_out_of_scope(ckpt.spec)  # raises nothing
    assert ckpt.spec.gpu_memory_service is None or ckpt.spec.gpu_memory_service.enabled is False


def test_examples_decode():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        kinds = {"DynamoCheckpoint": DynamoCheckpoint, "DynamoGraphDeployment": DynamoGraphDeployment}
        if kind := kinds.get(doc["kind"]):
            convert(doc, kind)


def test_dgd_service_defaults():
    dgd = convert(yaml.safe_load((EXAMPLES / "dgd-checkpoint.yaml").read_text()), DynamoGraphDeployment)
    worker = dgd.spec.services["VllmDecodeWorker"]
    assert worker.checkpoint.enabled and worker.checkpoint.startup_policy is StartupPolicy.IMMEDIATE
    assert dgd.spec.services["Frontend"].checkpoint is None


def test_bad_dgd_names_the_field():
    with pytest.raises(InvalidObject) as err:
        convert({"metadata": {}, "spec": {"services": {"w": {"replicas": -1}}}}, DynamoGraphDeployment)
    assert "replicas: expected >= 0" in str(err.value)


def test_operator_config_defaults_and_errors():
    config = parse_config("")
    assert config.checkpoint.enabled is False
    assert config.checkpoint.storage.pvc.pvc_name == "snapshot-pvc"
    assert config.checkpoint.storage.pvc.base_path == "/checkpoints"
    assert config.checkpoint.storage.access_mode is StorageAccessMode.AGENT_MOUNT
    assert config.checkpoint.cleanup_image == "busybox:1.36"
    spec_example = """
checkpoint:
  enabled: true
  storage:
    type: pvc
    pvc: {pvcName: snapshot-pvc, basePath: /checkpoints, create: false, size: 1Ti,
          storageClassName: "", accessMode: ReadWriteMany}
  cleanupImage: busybox:1.36
"""
    assert parse_config(spec_example).checkpoint.storage.pvc.size == "1Ti"
    with pytest.raises(InvalidObject) as err:
        parse_config("checkpoint: {storage: {type: oci}}")
    assert str(err.value) == "checkpoint.storage.type: invalid enum value 'oci' (expected one of: pvc, s3)"
    with pytest.raises(InvalidObject, match=r"checkpoint\.storage\.pvc\.size: required when"):
        parse_config("checkpoint: {storage: {pvc: {create: true}}}")
    with pytest.raises(InvalidObject, match=r"checkpoint\.storage\.pvc\.basePath"):
        parse_config("checkpoint: {storage: {pvc: {basePath: relative/path}}}")
