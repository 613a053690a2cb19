"""The user guide's commands and manifests, and upstream's sample, as a user migrating from upstream types
them: real helm, `kubectl apply --validate=strict` into the local control plane, snapshotctl against it.
Written from the documents in ../shared/seed/upstream/ (see docs/compatibility.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.api import StorageAccessMode, parse_config
from dynamo_snapshot.controllers.podshape import checkpoint_source_template
from tests.controllers.support import Cluster, agent_daemonset, enabled_config
from tests.helm.conftest import OPERATOR_CHART, SNAPSHOT_CHART

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "snapshotctl-pod.yaml"

# The guide's operator values for the shared-agent (podMount) install, in upstream's platform-chart shape.
GUIDE_OPERATOR_VALUES = """
dynamo-operator:
  checkpoint:
    enabled: true
    storage:
      type: pvc
      pvc:
        pvcName: snapshot-pvc
        basePath: /checkpoints
        create: true
        size: 1Ti
        storageClassName: ""
        accessMode: ReadWriteMany
"""

# Upstream's sample DynamoCheckpoint, in its shape: legacy identity, gpuMemoryService off, a Job template.
UPSTREAM_SAMPLE = {
    "apiVersion": "nvidia.com/v1alpha1", "kind": "DynamoCheckpoint", "metadata": {"name": "sample-qwen"},
    "spec": {
        "identity": {"model": "Qwen/Qwen3-0.6B", "backendFramework": "vllm", "tensorParallelSize": 1,
                     "pipelineParallelSize": 1, "dtype": "bfloat16", "maxModelLen": 2048},
        "gpuMemoryService": {"enabled": False},
        "job": {"activeDeadlineSeconds": 3600, "podTemplateSpec": {"spec": {
            "restartPolicy": "Never", "imagePullSecrets": [{"name": "pull-secret"}],
            "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": "cache-pvc"}}],
            "containers": [{
                "name": "main", "image": "registry.example.com/worker-placeholder:1.0.0",
                "command": ["python3"], "args": ["-m", "worker", "--model", "Qwen/Qwen3-0.6B"],
                "envFrom": [{"secretRef": {"name": "token"}}],
                "env": [{"name": "HF_HOME", "value": "/cache"}, {"name": "DEBUG", "value": "OFF"}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}},
    },
}


def rendered(helm, chart: Path, *args: str, namespace: str = "default") -> list[dict]:
    text = helm.run("template", "snapshot", str(chart), f"--namespace={namespace}", *args).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def operator_config(objects: list[dict]):
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    return parse_config(configmap["data"]["config.yaml"])


def test_the_guides_operator_values_under_dynamo_operator_mean_podmount_with_created_pvcs(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(GUIDE_OPERATOR_VALUES)
    config = operator_config(rendered(helm, OPERATOR_CHART, "-f", str(values)))
    assert config.checkpoint.enabled
    assert config.checkpoint.storage.access_mode is StorageAccessMode.POD_MOUNT
    assert (config.checkpoint.storage.pvc.create, config.checkpoint.storage.pvc.size) == (True, "1Ti")
    assert config == parse_config(GUIDE_OPERATOR_VALUES)  # the operator reads the same shape the same way


def test_the_guides_platform_check_of_the_operator_config_shows_enabled_true(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text("dynamo-operator:\n  checkpoint:\n    enabled: true\n")
    configmap = next(o for o in rendered(helm, OPERATOR_CHART, "-f", str(values)) if o["kind"] == "ConfigMap")
    block = configmap["data"]["config.yaml"].split("checkpoint:", 1)[1]
    assert "enabled: true" in block


def test_other_platform_chart_keys_are_refused_by_name(helm):
    result = helm.run("template", "x", str(OPERATOR_CHART), "--set=dynamo-operator.dynamo.enabled=true", check=False)
    assert result.returncode != 0 and "dynamo-operator.dynamo is not a setting of this chart" in result.stderr


def test_a_legacy_worker_that_writes_ready_for_checkpoint_passes_the_readiness_probe(tmp_path):
    template = {"spec": {"containers": [{"name": "main", "image": "w-placeholder"}]}}
    shaped = checkpoint_source_template(template, target="main", checkpoint_id="abc", artifact_version="1",
                                        shared_memory="1Gi", storage=None)
    command = shaped["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    local = [part.replace("/snapshot-control", str(tmp_path)) for part in command]
    assert subprocess.run(local, capture_output=True).returncode != 0  # nothing written yet: not ready
    (tmp_path / "ready-for-checkpoint").write_text("")
    assert subprocess.run(local, capture_output=True).returncode == 0
    (tmp_path / "ready-for-checkpoint").unlink()
    (tmp_path / "ready-for-snapshot").write_text("{}")
    assert subprocess.run(local, capture_output=True).returncode == 0


@pytest.mark.integration
def test_the_guides_snapshot_chart_install_with_pvc_create_gives_a_1ti_pvc(helm, kubectl, namespace):
    objects = rendered(helm, SNAPSHOT_CHART, "--set=storage.pvc.create=true", namespace=namespace)
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    kubectl("apply", "--validate=strict", "--dry-run=server", "-n", namespace, "-f", "-",
            input=yaml.safe_dump_all(objects))


@pytest.mark.integration
def test_the_guides_shared_agent_install_is_accepted_by_the_api_server(helm, kubectl, namespace):
    objects = rendered(helm, SNAPSHOT_CHART, "--set=storage.accessMode=podMount", "--set=storage.pvc.create=false",
                       "--set=rbac.namespaceRestricted=false", namespace=namespace)
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    kubectl("apply", "--validate=strict", "--dry-run=server", "-n", namespace, "-f", "-",
            input=yaml.safe_dump_all(objects))


@pytest.mark.integration
def test_upstreams_sample_dynamocheckpoint_applies_with_strict_field_validation(kubectl, namespace):
    kubectl("apply", "--validate=strict", "-n", namespace, "-f", "-", input=json.dumps(UPSTREAM_SAMPLE))
    stored = json.loads(kubectl("get", "dckpt", "sample-qwen", "-n", namespace, "-o", "json"))
    assert stored["spec"]["gpuMemoryService"] == {"enabled": False}


def snapshotctl(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamo_snapshot.cli.snapshotctl", *args,
                           f"--kubeconfig={kubeconfig}"], capture_output=True, text=True, timeout=120)


@pytest.mark.integration
def test_snapshotctl_checkpoint_with_the_readmes_flags_waits_and_prints_key_value_lines(kubeconfig, kubectl,
                                                                                         namespace):
    cluster = Cluster(kubectl, namespace)
    cluster.apply(agent_daemonset())
    waiting = subprocess.Popen([sys.executable, "-m", "dynamo_snapshot.cli.snapshotctl", "checkpoint", "--manifest",
                                str(EXAMPLE), "--container", "main", "--namespace", namespace,
                                "--checkpoint-id", "manual-snapshot-123", f"--kubeconfig={kubeconfig}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = cluster.wait_created("job", "checkpoint-job-manual-snapshot-123-1")
        cluster.agent_verdict(job["metadata"]["name"], "completed")  # the test plays the agent
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    lines = dict(line.split("=", 1) for line in out.splitlines())
    assert lines == {"status": "completed", "namespace": namespace, "name": "vllm-worker-snapshot",
                     "checkpoint_job": "checkpoint-job-manual-snapshot-123-1", "checkpoint_id": "manual-snapshot-123",
                     "checkpoint_location": "/checkpoints/manual-snapshot-123"}


@pytest.mark.integration
def test_snapshotctl_restore_with_the_readmes_flags_creates_a_restore_pod(kubeconfig, kubectl, namespace):
    Cluster(kubectl, namespace).apply(agent_daemonset())
    result = snapshotctl("restore", "--manifest", str(EXAMPLE), "--containers", "main", "--namespace", namespace,
                         "--checkpoint-id", "manual-snapshot-123", "-o", "json", kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    pod = json.loads(kubectl("get", "pod", json.loads(result.stdout)["pod"], "-n", namespace, "-o", "json"))
    assert pod["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"] == "manual-snapshot-123"


def test_snapshotctl_takes_the_container_from_the_manifests_annotation(tmp_path):
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["annotations"] = {"nvidia.com/snapshot-target-containers": "main"}
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    # no --container: the annotation names it, so the only failure left is the missing kubeconfig
    result = snapshotctl("checkpoint", "--manifest", str(manifest), "--timeout", "45m",
                         kubeconfig=tmp_path / "no-such-kubeconfig")
    assert result.returncode == 2 and "no kubeconfig at" in result.stderr, result.stderr


def test_snapshotctl_names_an_annotation_mismatch_before_reading_the_kubeconfig(tmp_path):
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"].setdefault("annotations", {})["nvidia.com/snapshot-target-containers"] = "main"
    pod["spec"]["containers"].append({"name": "side", "image": "busybox"})
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    result = snapshotctl("checkpoint", "-f", str(manifest), "--container", "side",
                         kubeconfig=tmp_path / "no-such-kubeconfig")
    assert result.returncode == 2
    assert "nvidia.com/snapshot-target-containers=main disagrees" in result.stderr


@pytest.mark.parametrize(("flags", "named"), [
    (["--checkpoint-id", "tmp"], "--checkpoint-id"), (["--base-path", "../../etc"], "--base-path"),
    (["--placeholder-pattern", "("], "--placeholder-pattern")])
def test_snapshotctl_refuses_flags_that_cannot_work_naming_the_flag(tmp_path, flags, named):
    result = snapshotctl("checkpoint", "--manifest", str(EXAMPLE), "--container", "main", *flags,
                         kubeconfig=tmp_path / "no-such-kubeconfig")
    assert result.returncode == 2 and f"error: {named}" in result.stderr, result.stderr


def test_snapshotctl_refuses_an_empty_restore_checkpoint_id(tmp_path):
    result = snapshotctl("restore", "--manifest", str(EXAMPLE), "--containers", "main", "--checkpoint-id", "",
                         kubeconfig=tmp_path / "no-such-kubeconfig")
    assert result.returncode == 2 and "--checkpoint-id" in result.stderr


@pytest.mark.integration
def test_upstreams_sample_with_gms_enabled_fails_naming_the_field(cluster, start_operator):
    cluster.apply(agent_daemonset())
    start_operator(enabled_config())
    sample = json.loads(json.dumps(UPSTREAM_SAMPLE))
    sample["metadata"]["name"] = "with-gms"
    sample["spec"]["gpuMemoryService"]["enabled"] = True
    cluster.apply(sample)
    failed = cluster.wait_phase("with-gms", "Failed")
    assert failed["status"]["message"].startswith("spec.gpuMemoryService.enabled: GMS + Snapshot is not supported")
    assert not json.loads(cluster.kubectl("get", "jobs", "-n", cluster.namespace, "-o", "json"))["items"]
