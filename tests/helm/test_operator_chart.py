"""The operator chart rendered by the real helm: the Deployment's command line, the configuration file
the operator parses, the RBAC scope, and values refused with a clear error."""

import pytest

from dynamo_snapshot.api import StorageAccessMode, parse_config

from .conftest import OPERATOR_CHART, kinds, only

BASE_COMMAND = [
    "dynamo-snapshot", "operator", "--config=/etc/dynamo-snapshot/config.yaml", "--leader-elect",
    "--leader-election-namespace=$(POD_NAMESPACE)", "--leader-election-id=dynamo-snapshot-operator",
    "--metrics-bind-address=:8080",
    "--health-probe-bind-address=:8081",
]
MODES = {
    "default": {},
    "enabled": {"checkpoint.enabled": "true"},
    "podMount-create": {"checkpoint.enabled": "true", "checkpoint.storage.accessMode": "podMount",
                        "checkpoint.storage.pvc.create": "true", "checkpoint.storage.pvc.size": "1Ti"},
    "restricted": {"namespaceRestricted": "true", "watchNamespace": "team-a"},
}


def render(helm, **values):
    return helm.template(OPERATOR_CHART, namespace="dynamo-system", release="dynamo", values=values)


def operator(objects) -> dict:
    (container,) = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def config(objects):
    return parse_config(only(objects, "ConfigMap")["data"]["config.yaml"])


@pytest.mark.parametrize("mode", MODES)
def test_lint_passes_in_every_mode(helm, mode):
    helm.run("lint", "--strict", str(OPERATOR_CHART), *helm.set_args(MODES[mode]))


def test_crds_ship_with_the_chart_unchanged(helm):
    """Helm installs crds/ itself; the files there are the project's only copy of the CRDs."""
    shown = helm.run("show", "crds", str(OPERATOR_CHART)).stdout
    for name in ("dynamocheckpoints.nvidia.com", "dynamographdeployments.nvidia.com"):
        assert f"name: {name}" in shown
    assert not [o for o in render(helm) if o["kind"] == "CustomResourceDefinition"], \
        "CRDs must come from crds/ only, not from templates/"


def test_cluster_wide_deployment(helm):
    objects = render(helm)
    assert kinds(objects) == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "Deployment", "Role", "RoleBinding",
                              "ServiceAccount"]
    container = operator(objects)
    assert container["command"] == BASE_COMMAND
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/dynamo-snapshot")
    volume = next(v for v in only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == only(objects, "ConfigMap")["metadata"]["name"]
    # The leader-election Lease lives in the operator's own namespace.
    election = only(objects, "Role")
    assert election["metadata"]["namespace"] == "dynamo-system"
    assert any("leases" in r["resources"] and "create" in r["verbs"] for r in election["rules"])


@pytest.mark.parametrize(("values", "watched"), [
    ({"namespaceRestricted": "true"}, "dynamo-system"),
    ({"namespaceRestricted": "true", "watchNamespace": "team-a"}, "team-a"),
])
def test_namespace_restricted(helm, values, watched):
    objects = render(helm, **values)
    # only the Nodes' read for pre-staging is cluster-wide (tests/helm/test_rbac.py); without it, nothing
    assert [o["metadata"]["name"] for o in objects if o["kind"].startswith("ClusterRole")] == \
        [f"dynamo-operator-nodes-{watched}"] * 2
    bare = render(helm, **values, **{"checkpoint.staging.maxNodes": "0"})
    assert "ClusterRole" not in kinds(bare) and "ClusterRoleBinding" not in kinds(bare)
    assert operator(objects)["command"] == [*BASE_COMMAND, f"--namespace={watched}"]
    roles = {o["metadata"]["name"]: o["metadata"]["namespace"] for o in objects if o["kind"] == "Role"}
    assert roles == {"dynamo-operator": watched, "dynamo-operator-leader-election": "dynamo-system"}
    binding = next(o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["namespace"] == watched)
    assert binding["subjects"][0]["namespace"] == "dynamo-system"


def test_default_config_is_the_operator_default_but_disabled(helm):
    parsed = config(render(helm))
    assert parsed.checkpoint.enabled is False
    assert parsed.checkpoint.storage.access_mode is StorageAccessMode.AGENT_MOUNT
    assert (parsed.checkpoint.storage.pvc.pvc_name, parsed.checkpoint.storage.pvc.base_path) == \
        ("snapshot-pvc", "/checkpoints")
    assert parsed.checkpoint.cleanup_image == "busybox:1.36"
    assert parsed.checkpoint.staging.max_nodes == 3


def test_config_block_renders_every_value(helm):
    """What the guide has the user verify: the rendered config includes `enabled: true`, and the operator
    parses every storage setting as given."""
    objects = render(helm, **{
        "checkpoint.enabled": "true", "checkpoint.storage.accessMode": "podMount",
        "checkpoint.storage.pvc.pvcName": "ckpt", "checkpoint.storage.pvc.basePath": "/data/ckpt",
        "checkpoint.storage.pvc.create": "true", "checkpoint.storage.pvc.size": "500Gi",
        "checkpoint.storage.pvc.storageClassName": "fast-rwo", "checkpoint.storage.pvc.accessMode": "ReadWriteOnce",
        "checkpoint.cleanupImage": "registry.local/busybox:1.36",
    })
    assert "enabled: true" in only(objects, "ConfigMap")["data"]["config.yaml"]
    c = config(objects).checkpoint
    pvc = c.storage.pvc
    assert c.enabled is True and c.storage.access_mode is StorageAccessMode.POD_MOUNT
    assert (pvc.pvc_name, pvc.base_path, pvc.create, pvc.size, pvc.storage_class_name, pvc.access_mode) == \
        ("ckpt", "/data/ckpt", True, "500Gi", "fast-rwo", "ReadWriteOnce")
    assert c.cleanup_image == "registry.local/busybox:1.36"


def test_s3_storage_reaches_the_operator_with_the_bucket_and_prefix(helm):
    c = config(render(helm, **{"checkpoint.enabled": "true", "checkpoint.storage.type": "s3",
                               "checkpoint.storage.s3.bucket": "ckpts", "checkpoint.storage.s3.prefix": "fleet/a"}))
    assert (c.checkpoint.storage.type, c.checkpoint.storage.s3.url("ck1")) == ("s3", "s3://ckpts/fleet/a/ck1")


def test_config_change_restarts_the_operator(helm):
    before, after = (only(render(helm, **v), "Deployment")["spec"]["template"]["metadata"]["annotations"]
                     ["checksum/config"] for v in ({}, {"checkpoint.enabled": "true"}))
    assert before != after


@pytest.mark.parametrize(("values", "names"), [
    ({"checkpoint.storage.pvc.create": "true"}, "checkpoint.storage.pvc.size"),
    ({"checkpoint.storage.accessMode": "hostMount"}, "checkpoint.storage.accessMode"),
    ({"checkpoint.storage.type": "oci"}, "checkpoint.storage.type must be pvc or s3"),
    ({"checkpoint.storage.type": "s3"}, "checkpoint.storage.s3.bucket is required"),
    ({"checkpoint.storage.pvc.basePath": "/"}, "checkpoint.storage.pvc.basePath"),
    ({"checkpoint.storage.pvc.pvcName": ""}, "checkpoint.storage.pvc.pvcName"),
    ({"checkpoint.storage.pvc.accessMode": "RWX"}, "checkpoint.storage.pvc.accessMode"),
    ({"checkpoint.enabled": "yes please"}, "checkpoint.enabled"),
    ({"watchNamespace": "team-a"}, "namespaceRestricted=true"),
])
def test_bad_values_fail_naming_the_value(helm, values, names):
    assert names in helm.template_error(OPERATOR_CHART, values=values)
