"""The charts' rendered objects on the real local control plane: the API server accepts them, the
operator's storage discovery works on the stored agent DaemonSet, and the RBAC grants what each
component needs in the right namespaces and nothing it must not have (checked with `kubectl auth can-i`,
that is, by the API server's own authorizer). Also a real `helm install`/`uninstall`."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from dynamo_snapshot.agent.service import main as agent_main
from dynamo_snapshot.api import OperatorConfig, names, parse_config
from dynamo_snapshot.controllers.storage import resolve_storage

from .conftest import OPERATOR_CHART, SNAPSHOT_CHART

pytestmark = pytest.mark.integration


@pytest.fixture
def apply(kubectl):
    """Apply rendered objects; delete the cluster-scoped ones afterwards (namespaces go with the test)."""
    cluster_scoped: list[dict] = []

    def _apply(objects: list[dict], namespace: str | None = None) -> None:
        cluster_scoped.extend(o for o in objects if "namespace" not in o["metadata"])
        args = ["-n", namespace] if namespace else []
        kubectl("apply", *args, "-f", "-", input=yaml.safe_dump_all(objects))

    yield _apply
    for obj in cluster_scoped:
        kubectl.run("delete", obj["kind"], obj["metadata"]["name"], "--ignore-not-found", check=False)


@pytest.fixture
def other_namespace(kubectl, namespace):
    name = f"{namespace[:50]}-o"
    kubectl("create", "namespace", name)
    yield name
    kubectl.run("delete", "namespace", name, "--wait=false", check=False)


def can_i(kubectl, user: str, verb: str, resource: str, namespace: str) -> bool:
    """Ask the API server's authorizer (a SubjectAccessReview). `resource` is `plural[.group][/subresource]`
    with an optional `=name`; unlike `kubectl auth can-i`, this needs no discovery of the resource type, so
    OpenShift's SecurityContextConstraints can be checked on a plain cluster."""
    resource, _, name = resource.partition("=")
    resource, _, subresource = resource.partition("/")
    plural, _, group = resource.partition(".")
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {
        "user": user, "resourceAttributes": {"namespace": namespace, "verb": verb, "group": group,
                                             "resource": plural, "subresource": subresource, "name": name}}}
    answer = json.loads(kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)))
    return answer["status"].get("allowed", False)


def service_account(objects: list[dict]) -> str:
    sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]
    return f"system:serviceaccount:{sa['namespace']}:{sa['name']}"


def test_agent_mount_install_is_accepted_and_discoverable(helm, kubectl, apply, namespace, other_namespace):
    objects = helm.template(SNAPSHOT_CHART, namespace=namespace, release="snapshot",
                            values={"storage.pvc.size": "1Gi"})
    apply(objects, namespace)

    stored = json.loads(kubectl("get", "daemonsets", "-n", namespace, "-o", "json",
                                "-l", "app.kubernetes.io/component=snapshot-agent"))["items"]
    storage = resolve_storage(namespace, OperatorConfig(), daemonsets=stored)
    assert (storage.pvc_name, storage.base_path) == ("snapshot-pvc", "/checkpoints")
    pvc = json.loads(kubectl("get", "pvc", "snapshot-pvc", "-n", namespace, "-o", "json"))
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    # seccomp.deploy (default, as upstream): the profile and the init container that installs it, as stored
    profiles = json.loads(kubectl("get", "configmap", "snapshot-agent-seccomp", "-n", namespace, "-o", "json"))
    assert "io_uring_setup" in json.loads(profiles["data"]["block-iouring.json"])["syscalls"][0]["names"]
    (init,) = stored[0]["spec"]["template"]["spec"]["initContainers"]
    assert init["name"] == "deploy-seccomp"

    sa = service_account(objects)
    for verb, resource in [("watch", "pods"), ("patch", "pods"), ("patch", "jobs.batch"),
                           ("create", "leases.coordination.k8s.io"), ("delete", "leases.coordination.k8s.io"),
                           ("create", "events.events.k8s.io")]:
        assert can_i(kubectl, sa, verb, resource, namespace), f"agent cannot {verb} {resource}"
    for verb, resource in [("delete", "pods"), ("create", "pods"), ("update", "pods"), ("create", "jobs.batch"),
                           ("get", "secrets"), ("list", "leases.coordination.k8s.io"), ("create", "events")]:
        assert not can_i(kubectl, sa, verb, resource, namespace), f"agent must not {verb} {resource}"
    # Namespace-local by default: nothing in any other namespace.
    assert not can_i(kubectl, sa, "list", "pods", other_namespace)


def test_shared_pod_mount_agent_on_crio_openshift(helm, kubectl, apply, namespace, other_namespace):
    objects = helm.template(SNAPSHOT_CHART, namespace=namespace, release="snapshot", values={
        "storage.accessMode": "podMount", "runtime.type": "crio", "openshift.enabled": "true"})
    apply(objects, namespace)

    assert json.loads(kubectl("get", "pvc", "-n", namespace, "-o", "json"))["items"] == []
    ds = json.loads(kubectl("get", "daemonset", "snapshot-agent", "-n", namespace, "-o", "json"))
    assert "--runtime-socket=/var/run/crio/crio.sock" in ds["spec"]["template"]["spec"]["containers"][0]["command"]

    sa = service_account(objects)
    # One agent serves workload pods and checkpoint Jobs of every namespace.
    assert can_i(kubectl, sa, "patch", "pods", other_namespace)
    assert can_i(kubectl, sa, "patch", "jobs.batch", other_namespace)
    assert can_i(kubectl, sa, "use", "securitycontextconstraints.security.openshift.io=privileged", namespace)
    assert not can_i(kubectl, sa, "use", "securitycontextconstraints.security.openshift.io=anyuid", namespace)


def lease(name: str, namespace: str, labels: dict[str, str] | None = None) -> str:
    return json.dumps({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
                       "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 15}})


def test_a_cluster_wide_agent_cannot_touch_leases_that_are_not_a_checkpoints(helm, kubectl, apply, namespace,
                                                                          other_namespace):
    """RBAC lets the podMount agent write Leases everywhere; the chart's ValidatingAdmissionPolicy lets it
    write only those labelled with a checkpoint ID (not, say, a controller's leader-election Lease)."""
    objects = helm.template(SNAPSHOT_CHART, namespace=namespace, release="snapshot",
                            values={"storage.accessMode": "podMount"},
                            api_versions=["admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"])
    assert "ValidatingAdmissionPolicy" in [o["kind"] for o in objects]
    apply(objects, namespace)
    ours = {names.LABEL_CHECKPOINT_ID: "ckpt-1"}
    kubectl("create", "-f", "-", input=lease("kube-controller-manager", other_namespace))
    kubectl("create", "-f", "-", input=lease("checkpoint-job", other_namespace, ours))
    as_agent = ["--as", service_account(objects), "-n", other_namespace, "--dry-run=server"]

    def agent(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return kubectl.run(*args, *as_agent, input=input, check=False)

    # The API server loads a new policy asynchronously: wait (bounded) until it refuses the first write.
    deadline = time.monotonic() + 60
    while (denied := agent("create", "-f", "-", input=lease("new-unlabelled", other_namespace))).returncode == 0:
        assert time.monotonic() < deadline, "the agent's label policy never took effect"
        time.sleep(0.5)
    assert "the snapshot agent may write only checkpoint objects" in denied.stderr
    def replaced(name: str, labels: dict[str, str]) -> str:  # the agent renews by PUT (update), never patch
        stored = json.loads(kubectl("get", "lease", name, "-n", other_namespace, "-o", "json"))
        stored["metadata"]["labels"] = labels
        return json.dumps(stored)

    for refused in (agent("replace", "-f", "-", input=replaced("kube-controller-manager", {})),
                    agent("delete", "lease", "kube-controller-manager"),
                    agent("replace", "-f", "-", input=replaced("checkpoint-job", {}))):
        assert refused.returncode != 0 and "the snapshot agent may" in refused.stderr, refused.stderr
    staged = {names.LABEL_STAGED_NODE: "node-1", names.LABEL_CHECKPOINT_ID: ""}  # service/staging.py's report
    for allowed in (agent("create", "-f", "-", input=lease("new-checkpoint-job", other_namespace, ours)),
                    agent("create", "-f", "-", input=lease(names.STAGED_LEASE_PREFIX + "node-1", other_namespace,
                                                         staged)),
                    agent("replace", "-f", "-", input=replaced("checkpoint-job", ours)),
                    agent("delete", "lease", "checkpoint-job")):
        assert allowed.returncode == 0, allowed.stderr
    # Others are not bound by it.
    assert kubectl.run("annotate", "lease", "kube-controller-manager", "x=y", "-n", other_namespace,
                       "--dry-run=server").returncode == 0


def event(name: str, namespace: str, controller: str) -> str:
    return json.dumps({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                       "metadata": {"name": name, "namespace": namespace},
                       "eventTime": "2026-01-01T00:00:00.000000Z", "reportingController": controller,
                       "reportingInstance": "x", "action": "Probe", "reason": "Probe", "type": "Normal",
                       "regarding": {"apiVersion": "v1", "kind": "Pod", "name": "p", "namespace": namespace}})


def test_a_cluster_wide_agent_changes_only_annotations_of_checkpoint_pods_and_writes_only_its_own_events(
        helm, kubectl, apply, namespace, other_namespace):
    """The policy alone (RBAC is the tests above): the requests carry the agent's user name, which the policy
    matches, and group system:masters, so that RBAC lets each of them reach admission."""
    objects = helm.template(SNAPSHOT_CHART, namespace=namespace, release="snapshot",
                            values={"storage.accessMode": "podMount"},
                            api_versions=["admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"])
    apply(objects, namespace)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "restore", "namespace": other_namespace, "labels": {names.LABEL_CHECKPOINT_ID: "c1"}},
           "spec": {"containers": [{"name": "main", "image": "placeholder:1"}]}}
    kubectl("create", "-f", "-", input=json.dumps(pod))
    kubectl("create", "-f", "-", input=event("theirs", other_namespace, "kubernetes.io/kubelet"))
    kubectl("create", "-f", "-", input=event("ours", other_namespace, agent_main.EVENT_CONTROLLER))
    as_agent = ["--as", service_account(objects), "--as-group", "system:masters", "-n", other_namespace,
                "--dry-run=server"]

    def agent(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return kubectl.run(*args, *as_agent, input=input, check=False)

    deadline = time.monotonic() + 60  # the API server loads a new policy asynchronously
    while (denied := agent("label", "pod", "restore", "extra=1")).returncode == 0:
        assert time.monotonic() < deadline, "the agent's policy never took effect"
        time.sleep(0.5)
    assert "the snapshot agent may change only the annotations of pods" in denied.stderr, denied.stderr
    image = json.dumps({"spec": {"containers": [{"name": "main", "image": "attacker:1"}]}})
    finalizer = json.dumps({"metadata": {"finalizers": ["example.com/hold"]}})
    for refused in (agent("patch", "pod", "restore", "-p", image),
                    agent("patch", "pod", "restore", "--type=merge", "-p", finalizer),
                    agent("create", "-f", "-", input=event("forged", other_namespace, "kubernetes.io/kubelet")),
                    agent("annotate", "event.events.k8s.io", "theirs", "x=y")):
        assert refused.returncode != 0 and "the snapshot agent may" in refused.stderr, refused.stderr
    own = event("new", other_namespace, agent_main.EVENT_CONTROLLER)
    for allowed in (agent("annotate", "pod", "restore", f"{names.restore_status_annotation('main')}=completed"),
                    agent("create", "-f", "-", input=own),
                    agent("patch", "event.events.k8s.io", "ours", "--type=merge", "-p", '{"series": {"count": 2, '
                          '"lastObservedTime": "2026-01-01T00:00:01.000000Z"}}')):
        assert allowed.returncode == 0, allowed.stderr


def test_operator_cluster_wide(helm, kubectl, apply, namespace, other_namespace):
    release = f"op-{namespace[-6:]}"  # its ClusterRole name must not clash with other tests'
    objects = helm.template(OPERATOR_CHART, namespace=namespace, release=release,
                            values={"checkpoint.enabled": "true"})
    apply(objects, namespace)

    stored = json.loads(kubectl("get", "configmap", f"{release}-operator-config", "-n", namespace, "-o", "json"))
    assert parse_config(stored["data"]["config.yaml"]).checkpoint.enabled is True

    sa = service_account(objects)
    for verb, resource in [("patch", "dynamocheckpoints.nvidia.com/status"),
                           ("update", "dynamographdeployments.nvidia.com/finalizers"),
                           ("create", "jobs.batch"), ("delete", "replicasets.apps"), ("list", "daemonsets.apps"),
                           ("create", "persistentvolumeclaims"), ("watch", "leases.coordination.k8s.io"),
                           ("create", "events.events.k8s.io")]:
        assert can_i(kubectl, sa, verb, resource, other_namespace), f"operator cannot {verb} {resource}"
    for verb, resource in [("patch", "pods"), ("delete", "daemonsets.apps"), ("update", "jobs.batch"),
                           ("update", "dynamocheckpoints.nvidia.com/status"),
                           ("delete", "dynamocheckpoints.nvidia.com"),
                           ("patch", "persistentvolumeclaims"), ("list", "namespaces"), ("get", "secrets")]:
        assert not can_i(kubectl, sa, verb, resource, other_namespace), f"operator must not {verb} {resource}"
    # It takes the leader-election Lease in its own namespace only, and renews no other Lease.
    assert can_i(kubectl, sa, "create", "leases.coordination.k8s.io", namespace)
    assert can_i(kubectl, sa, "update", "leases.coordination.k8s.io=dynamo-snapshot-operator", namespace)
    assert not can_i(kubectl, sa, "update", "leases.coordination.k8s.io=kube-controller-manager", namespace)
    assert not can_i(kubectl, sa, "create", "leases.coordination.k8s.io", other_namespace)
    assert can_i(kubectl, sa, "watch", "nodes", "") and not can_i(kubectl, sa, "patch", "nodes", "")  # pre-staging


def test_a_restricted_operator_with_pre_staging_may_read_nodes_and_nothing_else_cluster_wide(
        helm, kubectl, apply, namespace, other_namespace):
    objects = helm.template(OPERATOR_CHART, namespace=namespace, release="dynamo", values={
        "namespaceRestricted": "true", "watchNamespace": other_namespace})
    apply(objects)
    sa = service_account(objects)
    assert can_i(kubectl, sa, "watch", "nodes", "") and can_i(kubectl, sa, "list", "nodes", "")
    assert not can_i(kubectl, sa, "patch", "nodes", "")
    assert not can_i(kubectl, sa, "watch", "dynamocheckpoints.nvidia.com", "default")


def _job(name: str, labels: dict[str, str] | None = None, owner_kind: str | None = None) -> str:
    metadata: dict = {"name": name, "labels": labels or {}}
    if owner_kind:
        metadata["ownerReferences"] = [{"apiVersion": names.API_VERSION, "kind": owner_kind, "name": "x",
                                        "uid": "00000000-0000-0000-0000-000000000001", "controller": True}]
    pod = {"metadata": {"labels": {"app": name}}, "spec": {"restartPolicy": "Never", "containers": [
        {"name": "main", "image": "busybox:1.36"}]}}
    return json.dumps({"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": {"template": pod}})


def _replicaset(name: str, owner_kind: str | None = None) -> str:
    job = json.loads(_job(name, owner_kind=owner_kind))
    spec = {"replicas": 0, "selector": {"matchLabels": {"app": name}}, "template": job["spec"]["template"]}
    spec["template"]["spec"]["restartPolicy"] = "Always"
    return json.dumps({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": job["metadata"], "spec": spec})


def test_a_cluster_wide_operator_can_write_only_checkpoint_jobs_and_dgd_replicasets(helm, kubectl, apply, namespace,
                                                                                   other_namespace):
    """RBAC lets a cluster-wide operator create any Job or ReplicaSet (with any ServiceAccount) in every
    namespace; the chart's ValidatingAdmissionPolicy lets it write only its own kinds of them."""
    release = f"op-{namespace[-6:]}"
    objects = helm.template(OPERATOR_CHART, namespace=namespace, release=release,
                            values={"checkpoint.enabled": "true"},
                            api_versions=["admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"])
    assert "ValidatingAdmissionPolicy" in [o["kind"] for o in objects]
    apply(objects, namespace)
    ours = {names.LABEL_CHECKPOINT_ID: "ckpt-1"}
    as_operator = ["--as", service_account(objects), "-n", other_namespace, "--dry-run=server"]

    def operator(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return kubectl.run(*args, *as_operator, input=input, check=False)

    deadline = time.monotonic() + 60  # the API server loads a new policy asynchronously
    while (denied := operator("create", "-f", "-", input=_job("any-job"))).returncode == 0:
        assert time.monotonic() < deadline, "the operator's policy never took effect"
        time.sleep(0.5)
    assert "the snapshot operator may write only checkpoint Jobs" in denied.stderr
    for refused in (operator("create", "-f", "-", input=_job("labelled-only", ours)),
                    operator("create", "-f", "-", input=_job("owned-only", owner_kind=names.CHECKPOINT_KIND)),
                    operator("create", "-f", "-", input=_replicaset("any-rs")),
                    operator("create", "-f", "-", input=_replicaset("ckpt-rs", owner_kind=names.CHECKPOINT_KIND))):
        assert refused.returncode != 0 and "the snapshot operator may" in refused.stderr, refused.stderr
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "other-pvc"},
           "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
    refused = operator("create", "-f", "-", input=json.dumps(pvc))
    assert refused.returncode != 0 and "only the checkpoint PVC snapshot-pvc" in refused.stderr, refused.stderr
    for allowed in (operator("create", "-f", "-", input=_job("checkpoint-job", ours, names.CHECKPOINT_KIND)),
                    operator("create", "-f", "-", input=_replicaset("worker-rs", names.DGD_KIND)),
                    operator("create", "-f", "-", input=json.dumps({**pvc, "metadata": {"name": "snapshot-pvc"}}))):
        assert allowed.returncode == 0, allowed.stderr
    # Others are not bound by it.
    assert kubectl.run("create", "-f", "-", "-n", other_namespace, "--dry-run=server",
                       input=_job("admins-job")).returncode == 0


def test_operator_restricted_to_one_namespace(helm, kubectl, apply, namespace, other_namespace):
    objects = helm.template(OPERATOR_CHART, namespace=namespace, release="dynamo", values={
        "namespaceRestricted": "true", "watchNamespace": other_namespace, "checkpoint.staging.maxNodes": "0"})
    assert all(o["metadata"].get("namespace") for o in objects), \
        "restricted mode without pre-staging has no cluster-scoped objects"
    apply(objects)  # the Role for the watched namespace lands there, the rest in the release namespace

    sa = service_account(objects)
    assert can_i(kubectl, sa, "create", "jobs.batch", other_namespace)
    assert can_i(kubectl, sa, "watch", "dynamocheckpoints.nvidia.com", other_namespace)
    assert not can_i(kubectl, sa, "create", "jobs.batch", "default")
    assert not can_i(kubectl, sa, "watch", "dynamocheckpoints.nvidia.com", "default")
    assert can_i(kubectl, sa, "update", "leases.coordination.k8s.io=dynamo-snapshot-operator", namespace)
    assert not can_i(kubectl, sa, "list", "nodes", "")


def test_helm_install_uninstall_keeps_the_checkpoint_pvc(helm, kubectl, kubeconfig, namespace):
    """A real `helm install` of both charts; uninstalling the snapshot chart must not delete checkpoints,
    and installing it again adopts the PVC it left behind."""
    ctx = [f"--kubeconfig={kubeconfig}", f"--namespace={namespace}"]
    install = ["install", "snapshot", str(SNAPSHOT_CHART), *ctx, "--set", "storage.pvc.size=1Gi"]
    notes = helm.run(*install).stdout
    assert "daemonset/snapshot-agent" in notes
    kubectl("get", "daemonset", "snapshot-agent", "-n", namespace)

    helm.run("uninstall", "snapshot", *ctx)
    assert kubectl.run("get", "daemonset", "snapshot-agent", "-n", namespace, check=False).returncode != 0
    kubectl("get", "pvc", "snapshot-pvc", "-n", namespace)
    helm.run(*install)

    # The operator chart with its CRDs already present (helm skips existing CRDs), namespace-restricted
    # so that the release leaves nothing cluster-scoped behind.
    notes = helm.run("install", "dynamo", str(OPERATOR_CHART), *ctx, "--set", "namespaceRestricted=true",
                     "--set", "checkpoint.enabled=true").stdout
    assert "WARNING" not in notes
    config = kubectl("get", "configmap", "dynamo-operator-config", "-n", namespace,
                     "-o", "jsonpath={.data.config\\.yaml}")
    assert parse_config(config).checkpoint.enabled is True
    for release in ("dynamo", "snapshot"):
        helm.run("uninstall", release, *ctx)

