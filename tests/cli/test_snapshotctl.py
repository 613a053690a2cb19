"""snapshotctl: manifests validated before any cluster is touched; checkpoint and restore against the real
control plane, with the test playing the snapshot agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.cli.manifest import ManifestError
from dynamo_snapshot.cli.snapshotctl import existing_pod_targets, failure_detail
from tests.controllers.support import Cluster, agent_daemonset

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "snapshotctl-pod.yaml"
NOWHERE = """apiVersion: v1
kind: Config
clusters: [{name: x, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: x, user: {token: t}}]
contexts: [{name: x, context: {cluster: x, user: x}}]
current-context: x
"""


def snapshotctl(*args: str, kubeconfig: Path, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamo_snapshot.cli.snapshotctl", *args,
                           f"--kubeconfig={kubeconfig}"], input=input, capture_output=True, text=True, timeout=120)


def pod_yaml(tmp_path: Path, **changes) -> Path:
    pod = yaml.safe_load(EXAMPLE.read_text())
    for key, value in changes.items():
        if key == "labels":
            pod["metadata"]["labels"] = value
        elif key == "annotations":
            pod["metadata"]["annotations"] = value
        elif key == "image":
            pod["spec"]["containers"][0]["image"] = value
        elif key == "kind":
            pod["kind"] = value
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    return path


@pytest.fixture
def nowhere(tmp_path) -> Path:
    """A kubeconfig of a server that does not exist: validation must fail before any connection."""
    path = tmp_path / "nowhere.kubeconfig"
    path.write_text(NOWHERE)
    return path


@pytest.mark.parametrize(
    ("args", "changes", "message"),
    [
        (["checkpoint", "--container", "worker"], {}, "--container: no container named 'worker' in the pod"),
        (["checkpoint", "--container", "main"], {"kind": "Deployment"}, "snapshotctl needs a Pod manifest"),
        (["checkpoint", "--container", "main"], {"image": "vllm/vllm-openai:v0.9"}, "is not a placeholder image"),
        (["checkpoint", "--container", "main", "--checkpoint-id", "abc"],
         {"labels": {"nvidia.com/snapshot-checkpoint-id": "xyz"}}, "disagrees with --checkpoint-id abc"),
        (["restore", "--checkpoint-id", "abc", "--containers", "main"],
         {"annotations": {"nvidia.com/snapshot-target-containers": "other"}}, "disagrees with the containers given"),
        (["restore", "--checkpoint-id", "abc", "--containers", "main,ghost"], {}, "no container named 'ghost'"),
    ],
)
def test_bad_manifests_are_rejected_before_touching_a_cluster(tmp_path, nowhere, args, changes, message):
    result = snapshotctl(*args, "-f", str(pod_yaml(tmp_path, **changes)), kubeconfig=nowhere)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_restore_needs_exactly_one_target(tmp_path, nowhere):
    result = snapshotctl("restore", "--checkpoint-id", "abc", "--containers", "main", "-f",
                         str(pod_yaml(tmp_path)), "--pod", "p", kubeconfig=nowhere)
    assert result.returncode == 2 and "either --manifest pod.yaml" in result.stderr


def _existing(annotation: str | None = None) -> dict:
    pod = yaml.safe_load(EXAMPLE.read_text())
    pod["metadata"]["name"] = "standby"
    pod["spec"]["containers"].append({"name": "engine-1", "image": "placeholder"})
    pod["metadata"]["annotations"] = {} if annotation is None else {
        "nvidia.com/snapshot-target-containers": annotation}
    return pod


def test_restore_pod_uses_the_containers_flag_over_the_pods_annotation():
    assert existing_pod_targets(_existing("main"), "engine-1") == ["engine-1"]


def test_restore_pod_without_containers_uses_the_pods_target_containers_annotation():
    assert existing_pod_targets(_existing(" main , engine-1,"), None) == ["main", "engine-1"]


def test_restore_pod_without_containers_or_annotation_says_what_to_add():
    with pytest.raises(ManifestError) as err:
        existing_pod_targets(_existing(), None)
    assert str(err.value) == ("--containers: required (or annotate pod standby with "
                              "nvidia.com/snapshot-target-containers)")


def test_restore_pod_annotation_naming_an_unknown_container_is_refused_naming_it_and_the_pods_containers():
    with pytest.raises(ManifestError) as err:
        existing_pod_targets(_existing("main,ghost"), None)
    message = str(err.value)
    assert "pod standby" in message and "nvidia.com/snapshot-target-containers" in message
    assert "no container named 'ghost'" in message and "(containers: main, engine-1)" in message


def test_restore_pod_flag_naming_an_unknown_container_is_refused():
    with pytest.raises(ManifestError, match="--containers: no container named 'ghost'"):
        existing_pod_targets(_existing("main"), "ghost")


def test_unreachable_cluster_is_exit_1(tmp_path, nowhere):
    result = snapshotctl("checkpoint", "--container", "main", "-f", str(pod_yaml(tmp_path)), kubeconfig=nowhere)
    assert result.returncode == 1 and "error:" in result.stderr


# -- why a checkpoint failed, from the Job and its pods (no cluster) ------------------------------------------
def _failed_job(annotation: str | None = None) -> dict:
    annotations = {"nvidia.com/snapshot-checkpoint-status": annotation} if annotation else {}
    return {"metadata": {"name": "checkpoint-job-mine-1", "namespace": "team-a", "annotations": annotations},
            "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}


def _pod(exit_code: int = 137, reason: str = "Error", memory: str | None = "4Gi") -> dict:
    resources = {"limits": {"memory": memory}} if memory else {}
    return {"metadata": {"name": "checkpoint-job-mine-1-xyz"},
            "spec": {"nodeName": "node-3", "containers": [{"name": "main", "resources": resources}]},
            "status": {"containerStatuses": [
                {"name": "main", "state": {"terminated": {"reason": reason, "exitCode": exit_code}}}]}}


def test_a_sigkilled_checkpoint_pod_is_explained_with_its_node_and_how_to_run_again():
    assert failure_detail(_failed_job(), [_pod()], "main") == (
        "checkpoint pod checkpoint-job-mine-1-xyz was killed (container main exit code 137, SIGKILL) before the "
        "snapshot agent recorded a result: the snapshot agent on node node-3 may have died or restarted; nothing "
        "was promoted (no checkpoint was stored); run snapshotctl checkpoint again with another --checkpoint-id "
        "(or delete Job team-a/checkpoint-job-mine-1 first to reuse this one)")


def test_an_oomkilled_checkpoint_pod_says_to_raise_the_containers_memory_limit_in_the_manifest():
    detail = failure_detail(_failed_job(), [_pod(reason="OOMKilled")], "main")
    assert detail.startswith("checkpoint pod checkpoint-job-mine-1-xyz ran out of memory: container main was "
                             "OOMKilled (exit code 137) before the snapshot agent recorded a result; nothing was "
                             "promoted (no checkpoint was stored); raise container main's memory limit "
                             "(spec.containers[main].resources.limits.memory in the pod manifest, now 4Gi) and "
                             "run snapshotctl checkpoint again")


def test_a_pod_that_exited_with_an_error_is_reported_as_it_terminated():
    assert failure_detail(_failed_job(), [_pod(exit_code=2)], "main") == \
        "pod checkpoint-job-mine-1-xyz: container main terminated: Error (exit code 2)"


def test_a_pod_killed_after_the_agent_failed_the_checkpoint_is_not_blamed_on_the_agent_dying():
    detail = failure_detail(_failed_job(annotation="failed"), [_pod()], "main")
    assert detail == "pod checkpoint-job-mine-1-xyz: container main terminated: Error (exit code 137)"


@pytest.mark.integration
def test_checkpoint_without_agent_says_what_to_install(tmp_path, kubeconfig, namespace):
    result = snapshotctl("checkpoint", "--container", "main", "-f", str(pod_yaml(tmp_path)), "-n", namespace,
                         kubeconfig=kubeconfig)
    assert result.returncode == 2
    assert f"no snapshot-agent daemonset found in namespace {namespace}" in result.stderr
    assert "install the snapshot chart" in result.stderr


@pytest.mark.integration
def test_checkpoint_creates_the_job_and_waits_for_the_agent(tmp_path, kubeconfig, kubectl, namespace):
    cluster = Cluster(kubectl, namespace)
    cluster.apply(agent_daemonset())
    command = [sys.executable, "-m", "dynamo_snapshot.cli.snapshotctl", "checkpoint", "--container", "main",
               "-f", str(pod_yaml(tmp_path)), "-n", namespace, "--wait", "--timeout", "60", "-o", "json",
               f"--kubeconfig={kubeconfig}"]
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = cluster.wait_created("job", _job_name(cluster))
        checkpoint_id = job["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"]
        assert len(checkpoint_id) == 16  # generated, since neither the flag nor the manifest had one
        pod = job["spec"]["template"]
        assert pod["metadata"]["labels"]["nvidia.com/snapshot-is-checkpoint-source"] == "true"
        main = pod["spec"]["containers"][0]
        assert main["command"][:2] == ["/usr/local/bin/snapshot-init", "--"]
        assert not job["metadata"].get("ownerReferences") and not job["metadata"].get("finalizers")
        cluster.agent_verdict(job["metadata"]["name"], "completed")
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    assert json.loads(out) == {"checkpointID": checkpoint_id, "job": job["metadata"]["name"],
                               "namespace": namespace, "status": "completed"}


@pytest.mark.integration
def test_failed_checkpoint_exits_3_with_the_reason(tmp_path, kubeconfig, kubectl, namespace):
    cluster = Cluster(kubectl, namespace)
    cluster.apply(agent_daemonset())
    command = [sys.executable, "-m", "dynamo_snapshot.cli.snapshotctl", "checkpoint", "--container", "main",
               "-f", str(pod_yaml(tmp_path)), "-n", namespace, "--checkpoint-id", "mine", "--wait",
               "--timeout", "60", f"--kubeconfig={kubeconfig}"]
    waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        cluster.run_job_to("checkpoint-job-mine-1", exit_code=137, reason="OOMKilled")
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 3, err
    assert "status=failed" in out and "checkpoint_id=mine" in out and "OOMKilled" in out


@pytest.mark.integration
def test_restore_creates_a_restore_pod(tmp_path, kubeconfig, kubectl, namespace):
    cluster = Cluster(kubectl, namespace)
    cluster.apply(agent_daemonset())
    result = snapshotctl("restore", "-f", str(pod_yaml(tmp_path)), "--checkpoint-id", "abc", "--containers",
                         "main", "-n", namespace, "-o", "json", kubeconfig=kubeconfig)
    assert result.returncode == 0, result.stderr
    name = json.loads(result.stdout)["pod"]
    pod = cluster.get("pod", name)
    assert pod["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"] == "abc"
    assert pod["metadata"]["annotations"]["nvidia.com/snapshot-target-containers"] == "main"
    main = pod["spec"]["containers"][0]
    assert {"name": "DYN_SNAPSHOT_RESTORE_STANDBY", "value": "1"} in main["env"]
    assert main["startupProbe"]["exec"]["command"] == ["cat", "/snapshot-control/restore-complete"]


@pytest.mark.integration
def test_restore_patches_an_existing_compatible_pod_only(tmp_path, kubeconfig, kubectl, namespace):
    cluster = Cluster(kubectl, namespace)
    cluster.apply(agent_daemonset())
    plain = yaml.safe_load(EXAMPLE.read_text())
    plain["metadata"]["name"] = "plain"
    cluster.apply(plain)
    refused = snapshotctl("restore", "--pod", "plain", "--checkpoint-id", "abc", "--containers", "main",
                          "-n", namespace, kubeconfig=kubeconfig)
    assert refused.returncode == 2 and "not snapshot-compatible" in refused.stderr
    unnamed = snapshotctl("restore", "--pod", "plain", "--checkpoint-id", "abc", "-n", namespace,
                          kubeconfig=kubeconfig)
    assert unnamed.returncode == 2 and "Traceback" not in unnamed.stderr
    assert "--containers: required (or annotate pod plain with nvidia.com/snapshot-target-containers)" in \
        unnamed.stderr
    assert "nvidia.com/snapshot-checkpoint-id" not in (cluster.get("pod", "plain")["metadata"].get("labels") or {})
    # an existing pod is held to the placeholder rule as a manifest is: CRIU restores only into the wrapper
    foreign = yaml.safe_load(EXAMPLE.read_text())
    foreign["metadata"]["name"] = "foreign"
    foreign["spec"]["containers"][0]["image"] = "registry.example.com/someone/else:1"
    cluster.apply(foreign)
    not_placeholder = snapshotctl("restore", "--pod", "foreign", "--checkpoint-id", "abc", "--containers", "main",
                                  "-n", namespace, kubeconfig=kubeconfig)
    assert not_placeholder.returncode == 2 and "is not a placeholder image" in not_placeholder.stderr
    assert "nvidia.com/snapshot-checkpoint-id" not in (cluster.get("pod", "foreign")["metadata"].get("labels") or {})
    # a standby placeholder pod (made by restore -f with another ID) can be pointed at another checkpoint
    made = snapshotctl("restore", "-f", str(pod_yaml(tmp_path)), "--checkpoint-id", "first", "--containers",
                       "main", "-n", namespace, "-o", "json", kubeconfig=kubeconfig)
    name = json.loads(made.stdout)["pod"]
    kubectl("label", "pod", name, "-n", namespace, "nvidia.com/snapshot-checkpoint-id-")
    patched = snapshotctl("restore", "--pod", name, "--checkpoint-id", "second", "--containers", "main",
                          "-n", namespace, kubeconfig=kubeconfig)
    assert patched.returncode == 0, patched.stderr
    assert cluster.get("pod", name)["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"] == "second"
    # without --containers, the pod's target-containers annotation (restore -f wrote main) names them
    kubectl("label", "pod", name, "-n", namespace, "nvidia.com/snapshot-checkpoint-id-")
    annotated = snapshotctl("restore", "--pod", name, "--checkpoint-id", "fourth", "-n", namespace,
                            kubeconfig=kubeconfig)
    assert annotated.returncode == 0, annotated.stderr
    pod = cluster.get("pod", name)
    assert pod["metadata"]["labels"]["nvidia.com/snapshot-checkpoint-id"] == "fourth"
    assert pod["metadata"]["annotations"]["nvidia.com/snapshot-target-containers"] == "main"
    disagreeing = snapshotctl("restore", "--pod", name, "--checkpoint-id", "third", "--containers", "main",
                              "-n", namespace, kubeconfig=kubeconfig)
    assert disagreeing.returncode == 2 and "disagrees with --checkpoint-id third" in disagreeing.stderr


def _job_name(cluster: Cluster) -> str:
    from tests.controllers.support import eventually

    names: list[str] = []
    eventually(lambda: names.extend(j["metadata"]["name"] for j in cluster.list("jobs")) or names,
               what="snapshotctl's Job")
    return names[0]
