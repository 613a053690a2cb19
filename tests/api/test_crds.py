"""The CRDs on a real kube-apiserver: examples accepted, bad objects refused with the schema's error,
defaults applied, identity immutable, printer columns served through the table API."""

import json
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.api import DynamoCheckpoint, DynamoGraphDeployment, convert

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _checkpoint(name: str, **identity) -> str:
    ident = {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm", **identity}
    return yaml.safe_dump({
        "apiVersion": "nvidia.com/v1alpha1",
        "kind": "DynamoCheckpoint",
        "metadata": {"name": name},
        "spec": {
            "identity": {k: v for k, v in ident.items() if v is not None},
            "job": {"podTemplateSpec": {"spec": {"containers": [{"name": "main", "image": "placeholder"}]}}},
        },
    })


def test_examples_are_accepted_and_decode(kubectl, namespace):
    for path in sorted(EXAMPLES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] == "Pod":
            kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path))
            continue
        kubectl("apply", "-n", namespace, "-f", str(path))
        stored = json.loads(kubectl("get", "-n", namespace, "-o", "json", "-f", str(path)))
        convert(stored, DynamoCheckpoint if doc["kind"] == "DynamoCheckpoint" else DynamoGraphDeployment)


def test_schema_defaults_are_applied(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=_checkpoint("defaults"))
    stored = convert(json.loads(kubectl("get", "dckpt", "defaults", "-n", namespace, "-o", "json")), DynamoCheckpoint)
    assert stored.spec.identity.tensor_parallel_size == 1
    assert stored.spec.job.target_container_name == "main"
    assert stored.spec.job.active_deadline_seconds == 3600
    assert stored.spec.job.shared_memory == "8Gi"


@pytest.mark.parametrize(
    ("identity", "error"),
    [
        ({"model": None}, 'spec.identity.model: Required value'),
        ({"backendFramework": "tgi"}, 'spec.identity.backendFramework: Unsupported value: "tgi"'),
        ({"tensorParallelSize": 0}, "spec.identity.tensorParallelSize: Invalid value: 0: "
                                    "spec.identity.tensorParallelSize in body should be greater than or equal to 1"),
        ({"maxModelLen": -5}, "spec.identity.maxModelLen"),
    ],
)
def test_bad_checkpoints_are_rejected_by_the_schema(kubectl, namespace, identity, error):
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=_checkpoint("bad", **identity), check=False)
    assert result.returncode != 0
    assert error in result.stderr
    assert "bad" not in kubectl("get", "dckpt", "-n", namespace, "-o", "name")


def test_target_container_must_be_a_dns_label(kubectl, namespace):
    doc = yaml.safe_load(_checkpoint("badtarget"))
    doc["spec"]["job"]["targetContainerName"] = "Main_Container"
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and "spec.job.targetContainerName" in result.stderr


def test_identity_is_immutable(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=_checkpoint("frozen"))
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=_checkpoint("frozen", tensorParallelSize=2),
                         check=False)
    assert result.returncode != 0
    assert "spec.identity is immutable" in result.stderr
    stored = json.loads(kubectl("get", "dckpt", "frozen", "-n", namespace, "-o", "json"))
    assert stored["spec"]["identity"]["tensorParallelSize"] == 1
    # everything outside the identity can still change
    doc = yaml.safe_load(_checkpoint("frozen"))
    doc["spec"]["job"]["activeDeadlineSeconds"] = 60
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def test_status_is_a_subresource(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=_checkpoint("withstatus"))
    # a status written through the main resource is dropped...
    kubectl("patch", "dckpt", "withstatus", "-n", namespace, "--type=merge", "-p", '{"status":{"phase":"Ready"}}')
    stored = json.loads(kubectl("get", "dckpt", "withstatus", "-n", namespace, "-o", "json"))
    assert "phase" not in stored.get("status", {})
    # ...and accepted through /status, where an unknown phase is refused
    kubectl("patch", "dckpt", "withstatus", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", '{"status":{"phase":"Creating","checkpointID":"96429b2725761a09"}}')
    bad = kubectl.run("patch", "dckpt", "withstatus", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", '{"status":{"phase":"Done"}}', check=False)
    assert bad.returncode != 0 and "status.phase" in bad.stderr


def test_printer_columns_come_back_through_the_table_api(kubectl, namespace):
    kubectl("apply", "-n", namespace, "-f", "-", input=_checkpoint("table"))
    kubectl("patch", "dckpt", "table", "-n", namespace, "--subresource=status", "--type=merge",
            "-p", '{"status":{"phase":"Ready","checkpointID":"96429b2725761a09"}}')
    # kubectl get asks for `application/json;as=Table;g=meta.k8s.io`: the columns are the server's
    header, row = kubectl("get", "dckpt", "-n", namespace).splitlines()[:2]
    assert header.split() == ["NAME", "MODEL", "BACKEND", "PHASE", "CHECKPOINTID", "AGE"]
    assert row.split()[:5] == ["table", "meta-llama/Llama-2-7b-hf", "vllm", "Ready", "96429b2725761a09"]


def test_dgd_manual_mode_without_reference_is_refused(kubectl, namespace):
    doc = yaml.safe_load((EXAMPLES / "dgd-checkpoint.yaml").read_text())
    doc["spec"]["services"]["VllmDecodeWorker"]["checkpoint"] = {"enabled": True, "mode": "Manual"}
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and "Manual is deprecated" in result.stderr


def test_dgd_keeps_upstream_fields_it_does_not_own(kubectl, namespace):
    doc = yaml.safe_load((EXAMPLES / "dgd-checkpoint.yaml").read_text())
    doc["spec"]["services"]["VllmDecodeWorker"]["dynamoNamespace"] = "vllm-disagg"
    doc["spec"]["services"]["VllmDecodeWorker"]["subComponentType"] = "decode"
    kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    stored = json.loads(kubectl("get", "dgd", "vllm-disagg", "-n", namespace, "-o", "json"))
    worker = stored["spec"]["services"]["VllmDecodeWorker"]
    assert worker["dynamoNamespace"] == "vllm-disagg"
    assert worker["checkpoint"]["startupPolicy"] == "Immediate" and worker["checkpoint"]["deletionPolicy"] == "Delete"


@pytest.mark.parametrize(
    ("template", "field"),
    [
        ("main", "spec.job.podTemplateSpec"),
        ({"spec": {"containers": "main"}}, "spec.job.podTemplateSpec.spec.containers"),
        ({"spec": {"containers": [{"name": "main", "env": {"A": "1"}}]}},
         "spec.job.podTemplateSpec.spec.containers[0].env"),
        ({"spec": {"containers": [{"name": "main", "env": [{"name": "A", "value": 1}]}]}},
         "spec.job.podTemplateSpec.spec.containers[0].env[0].value"),
        ({"metadata": {"labels": []}, "spec": {"containers": [{"name": "main"}]}},
         "spec.job.podTemplateSpec.metadata.labels"),
    ],
)
def test_a_pod_template_with_wrong_types_is_refused_at_apply_time(kubectl, namespace, template, field):
    doc = yaml.safe_load(_checkpoint("badtemplate"))
    doc["spec"]["job"]["podTemplateSpec"] = template
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and field in result.stderr


@pytest.mark.parametrize(
    ("extra_pod_spec", "field"),
    [
        ({"mainContainer": "vllm"}, "extraPodSpec.mainContainer"),
        ({"mainContainer": {"env": {"A": "1"}}}, "extraPodSpec.mainContainer.env"),
        ({"mainContainer": {"args": "--model x"}}, "extraPodSpec.mainContainer.args"),
    ],
)
def test_a_dgd_main_container_with_wrong_types_is_refused_at_apply_time(kubectl, namespace, extra_pod_spec, field):
    doc = yaml.safe_load((EXAMPLES / "dgd-checkpoint.yaml").read_text())
    doc["spec"]["services"]["VllmDecodeWorker"]["extraPodSpec"] = extra_pod_spec
    result = kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert result.returncode != 0 and field in result.stderr
