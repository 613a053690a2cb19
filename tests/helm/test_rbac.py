"""Least privilege: each chart grants exactly the API calls its component's code makes, and no more.

Stages: read the code (every `client.<verb>(RESOURCE, ...)` and informer of the component, by AST) ->
compare with the explicit table below (the same as docs/security.md, "What each component may do") ->
render every chart mode with the real helm -> compare the granted (group, resource, verb) set with the
table, and check where (which namespaces, which names) the writes that matter are allowed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from dynamo_snapshot.agent.service import main as agent_main
from dynamo_snapshot.api import names
from dynamo_snapshot.controllers import common
from dynamo_snapshot.kube import resources

from .conftest import OPERATOR_CHART, REPO, SNAPSHOT_CHART, kinds

PACKAGE = REPO / "dynamo_snapshot"

# (API group, resource[/subresource], verb): what the code calls. Keep in step with docs/security.md.
AGENT_CALLS = {
    ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "patch"),
    ("batch", "jobs", "get"), ("batch", "jobs", "patch"),
    ("coordination.k8s.io", "leases", "get"), ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"), ("coordination.k8s.io", "leases", "delete"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
    # the node cache's watch (service/staging.py): granted only with the cache (cache.hostPath, or s3)
    ("nvidia.com", "dynamocheckpoints", "list"), ("nvidia.com", "dynamocheckpoints", "watch"),
}
AGENT_CACHE_CALLS = {("nvidia.com", "dynamocheckpoints", "list"), ("nvidia.com", "dynamocheckpoints", "watch")}
OPERATOR_CALLS = {
    ("nvidia.com", "dynamocheckpoints", "list"), ("nvidia.com", "dynamocheckpoints", "watch"),
    ("nvidia.com", "dynamocheckpoints", "create"), ("nvidia.com", "dynamocheckpoints", "patch"),
    ("nvidia.com", "dynamocheckpoints/status", "patch"),
    ("nvidia.com", "dynamographdeployments", "list"), ("nvidia.com", "dynamographdeployments", "watch"),
    ("nvidia.com", "dynamographdeployments/status", "patch"),
    ("batch", "jobs", "get"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"),
    ("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("batch", "jobs", "delete"),
    ("", "pods", "list"), ("", "pods", "watch"),
    ("apps", "replicasets", "list"), ("apps", "replicasets", "watch"), ("apps", "replicasets", "create"),
    ("apps", "replicasets", "patch"), ("apps", "replicasets", "delete"),
    ("apps", "daemonsets", "list"), ("apps", "daemonsets", "watch"),
    ("", "persistentvolumeclaims", "list"), ("", "persistentvolumeclaims", "watch"),
    ("", "persistentvolumeclaims", "create"),
    ("coordination.k8s.io", "leases", "list"), ("coordination.k8s.io", "leases", "watch"),
    # leader election (kube/leaderelection.py)
    ("coordination.k8s.io", "leases", "get"), ("coordination.k8s.io", "leases", "create"),
    ("coordination.k8s.io", "leases", "update"),
    ("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch"),
    # pre-staging (controllers/staging): granted only with checkpoint.staging.maxNodes > 0 (the default)
    ("", "nodes", "list"), ("", "nodes", "watch"),
}
OPERATOR_STAGING_CALLS = {("", "nodes", "list"), ("", "nodes", "watch")}
# Granted though no call names them: the API server asks for them on the caller's behalf.
OPERATOR_IMPLIED = {
    # ownerReferences with blockOwnerDeletion, under OwnerReferencesPermissionEnforcement (OpenShift)
    ("nvidia.com", "dynamocheckpoints/finalizers", "update"),
    ("nvidia.com", "dynamographdeployments/finalizers", "update"),
}
SCC = ("security.openshift.io", "securitycontextconstraints", "use")

# Where each component's API calls live: its package and the shared kube helpers it runs.
AGENT_SOURCES = [PACKAGE / "agent", PACKAGE / "kube" / "events.py"]
OPERATOR_SOURCES = [PACKAGE / "controllers", PACKAGE / "kube" / "events.py", PACKAGE / "kube" / "leaderelection.py"]

METHOD_VERBS = {
    "get": ("get", ""), "list": ("list", ""), "list_all": ("list", ""), "watch": ("watch", ""),
    "create": ("create", ""), "update": ("update", ""), "update_status": ("update", "status"),
    "patch": ("patch", ""), "patch_status": ("patch", "status"), "apply": ("patch", ""),
    "delete": ("delete", ""),
}
RESOURCES = {name: value for module in (resources, common) for name, value in vars(module).items()
             if isinstance(value, resources.Resource)}

AGENT_MODES = {
    "agentMount": {"storage.pvc.size": "1Ti"},
    "agentMount-cluster": {"storage.pvc.size": "1Ti", "rbac.namespaceRestricted": "false"},
    "podMount": {"storage.accessMode": "podMount"},
    "podMount-restricted": {"storage.accessMode": "podMount", "rbac.namespaceRestricted": "true"},
    "openshift": {"storage.accessMode": "podMount", "openshift.enabled": "true"},
    "agentMount-cache": {"storage.pvc.size": "1Ti", "cache.hostPath": "/mnt/nvme/cache", "cache.budgetGiB": "100"},
    "podMount-cache": {"storage.accessMode": "podMount", "cache.hostPath": "/mnt/nvme/cache", "cache.budgetGiB": "100"},
    # object storage: restores fetch into the node cache, so it is always on (its host path has a default)
    "s3-cache": {"storage.type": "s3", "storage.s3.bucket": "ckpts", "cache.budgetGiB": "100"},
}
OPERATOR_MODES = {
    "cluster": {},
    "restricted": {"namespaceRestricted": "true"},
    "restricted-elsewhere": {"namespaceRestricted": "true", "watchNamespace": "team-a"},
    "no-staging": {"checkpoint.staging.maxNodes": "0"},
    "restricted-no-staging": {"namespaceRestricted": "true", "checkpoint.staging.maxNodes": "0"},
}


# -- what the code calls ---------------------------------------------------------------------------------
def _python_files(roots: list[Path]) -> list[Path]:
    return sorted(f for root in roots for f in ([root] if root.is_file() else root.rglob("*.py")))


def _resource(node: ast.AST) -> resources.Resource | None:
    """`RESOURCE`, or `RESOURCE.at_version(...)` (RBAC names no version)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "at_version":
        node = node.func.value
    return RESOURCES.get(node.id) if isinstance(node, ast.Name) else None


def _subresource(call: ast.Call, default: str) -> str:
    for keyword in call.keywords:
        if keyword.arg == "subresource" and isinstance(keyword.value, ast.Constant):
            return keyword.value.value or default
    return default


def calls_in(roots: list[Path]) -> set[tuple[str, str, str]]:
    """(group, resource[/sub], verb) of every `<x>.<method>(RESOURCE, ...)` and informer in the sources."""
    found: set[tuple[str, str, str]] = set()
    for path in _python_files(roots):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(call, ast.Call) or not call.args:
                continue
            func = call.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("informer", "Informer"):
                args = call.args if name == "informer" else call.args[1:]
                if args and (res := _resource(args[0])):
                    found |= {(res.group, res.plural, "list"), (res.group, res.plural, "watch")}
            elif isinstance(func, ast.Attribute) and name in METHOD_VERBS and (res := _resource(call.args[0])):
                verb, sub = METHOD_VERBS[name]
                sub = _subresource(call, sub)
                found.add((res.group, f"{res.plural}/{sub}" if sub else res.plural, verb))
    return found


# -- what the charts grant ---------------------------------------------------------------------------------
def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def roles(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Role", "ClusterRole")]


def agent_objects(helm, mode: str) -> list[dict]:
    return helm.template(SNAPSHOT_CHART, namespace="gpu-workers", values=AGENT_MODES[mode])


def operator_objects(helm, mode: str) -> list[dict]:
    return helm.template(OPERATOR_CHART, namespace="dynamo-system", release="dynamo", values=OPERATOR_MODES[mode])


def granted_where(objects: list[dict], resource: str, verb: str) -> list[tuple[str, str, list[str]]]:
    """(kind, namespace or "*", resourceNames) of each rule that allows `verb` on `resource`."""
    return [(role["kind"], role["metadata"].get("namespace", "*"), rule.get("resourceNames", []))
            for role in roles(objects) for rule in role["rules"]
            if resource in rule["resources"] and verb in rule["verbs"]]


# -- the table is the code's ---------------------------------------------------------------------------------
def test_the_agent_table_is_every_api_call_the_agent_code_makes():
    assert calls_in(AGENT_SOURCES) == AGENT_CALLS


def test_the_operator_table_is_every_api_call_the_operator_code_makes():
    assert calls_in(OPERATOR_SOURCES) == OPERATOR_CALLS


# -- the charts grant the table, and nothing else ----------------------------------------------------------
@pytest.mark.parametrize("mode", AGENT_MODES)
def test_the_agent_is_granted_exactly_what_its_code_calls(helm, mode):
    objects = agent_objects(helm, mode)
    granted = set().union(*(grants(r["rules"]) for r in roles(objects)))
    expected = AGENT_CALLS | ({SCC} if mode == "openshift" else set())
    if not mode.endswith("-cache"):
        expected -= AGENT_CACHE_CALLS
    assert granted == expected, f"extra: {sorted(granted - expected)}; missing: {sorted(expected - granted)}"


@pytest.mark.parametrize("mode", OPERATOR_MODES)
def test_the_operator_is_granted_exactly_what_its_code_calls(helm, mode):
    objects = operator_objects(helm, mode)
    granted = set().union(*(grants(r["rules"]) for r in roles(objects)))
    expected = OPERATOR_CALLS | OPERATOR_IMPLIED
    if mode.endswith("no-staging"):
        expected -= OPERATOR_STAGING_CALLS
    assert granted == expected, f"extra: {sorted(granted - expected)}; missing: {sorted(expected - granted)}"


@pytest.mark.parametrize("chart", [SNAPSHOT_CHART, OPERATOR_CHART])
def test_no_rule_grants_a_wildcard(helm, chart):
    for role in roles(helm.template(chart, values={"storage.pvc.size": "1Ti"} if chart == SNAPSHOT_CHART else {})):
        for rule in role["rules"]:
            assert "*" not in [*rule["apiGroups"], *rule["resources"], *rule["verbs"]], rule


# -- what they may not do ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", AGENT_MODES)
def test_the_agent_may_not_create_update_or_delete_pods(helm, mode):
    objects = agent_objects(helm, mode)
    for verb in ("create", "update", "delete", "deletecollection", "get"):
        assert not granted_where(objects, "pods", verb), f"the agent may {verb} pods"
    assert not any(r.startswith("pods/") for role in roles(objects) for rule in role["rules"]
                   for r in rule["resources"]), "the agent writes no pod subresource (status, exec, eviction)"


@pytest.mark.parametrize("mode", AGENT_MODES)
def test_the_agent_may_not_read_secrets_or_create_jobs(helm, mode):
    """Its keys come from a mounted Secret, not the API; it confirms Jobs, never makes them."""
    objects = agent_objects(helm, mode)
    assert not [g for g in set().union(*(grants(r["rules"]) for r in roles(objects))) if g[1] == "secrets"]
    assert not granted_where(objects, "jobs", "create")
    assert not granted_where(objects, "jobs", "list")


@pytest.mark.parametrize("mode", ["agentMount", "podMount-restricted"])
def test_a_namespace_restricted_agent_is_granted_leases_only_in_the_release_namespace(helm, mode):
    objects = agent_objects(helm, mode)
    assert "ClusterRole" not in kinds(objects)
    for verb in ("get", "create", "update", "delete"):
        assert granted_where(objects, "leases", verb) == [("Role", "gpu-workers", [])]


@pytest.mark.parametrize("mode", ["agentMount-cache", "podMount-cache", "s3-cache"])
def test_the_node_cache_agent_only_reads_dynamocheckpoints(helm, mode):
    objects = agent_objects(helm, mode)
    assert {g[2] for role in roles(objects) for g in grants(role["rules"]) if g[1] == "dynamocheckpoints"} == {
        "list", "watch"}
    assert not [g for role in roles(objects) for g in grants(role["rules"]) if g[1].startswith("dynamocheckpoints/")]


@pytest.mark.parametrize("mode", ["restricted", "restricted-elsewhere"])
def test_a_namespace_restricted_operator_gets_a_cluster_role_only_to_read_nodes(helm, mode):
    objects = operator_objects(helm, mode)
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole"]
    assert [grants(r["rules"]) for r in cluster_roles] == [OPERATOR_STAGING_CALLS]
    assert granted_where(objects, "nodes", "list") == [("ClusterRole", "*", [])]


@pytest.mark.parametrize("mode", OPERATOR_MODES)
def test_the_operator_writes_only_its_leader_lease_and_only_in_its_own_namespace(helm, mode):
    objects = operator_objects(helm, mode)
    for verb in ("get", "update"):
        assert granted_where(objects, "leases", verb) == [("Role", "dynamo-system", ["dynamo-snapshot-operator"])]
    # create cannot be limited by name (the name is not known to the authorizer before the object exists)
    assert granted_where(objects, "leases", "create") == [("Role", "dynamo-system", [])]
    for verb in ("patch", "delete"):
        assert not granted_where(objects, "leases", verb)
    (container,) = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "--leader-election-id=dynamo-snapshot-operator" in container["command"], \
        "the Lease the operator takes must be the one its Role names"


@pytest.mark.parametrize("mode", OPERATOR_MODES)
def test_the_operator_may_not_write_pods_or_read_namespaces_or_secrets(helm, mode):
    objects = operator_objects(helm, mode)
    for resource, verb in [("pods", "patch"), ("pods", "delete"), ("pods", "create"), ("pods", "get"),
                           ("namespaces", "list"), ("secrets", "get"), ("secrets", "list")]:
        assert not granted_where(objects, resource, verb), f"the operator may {verb} {resource}"


@pytest.mark.parametrize("mode", OPERATOR_MODES)
def test_the_operator_never_replaces_its_objects_with_put(helm, mode):
    """Only patches: no `update` except the finalizers the API server checks, and the leader Lease."""
    objects = operator_objects(helm, mode)
    updates = {(g[1]) for role in roles(objects) for g in grants(role["rules"]) if g[2] == "update"}
    assert updates == {"dynamocheckpoints/finalizers", "dynamographdeployments/finalizers", "leases"}


def test_no_component_calls_the_api_by_raw_path():
    """A `client.request(...)` would escape the table above: every call goes through a named resource."""
    for path in _python_files(AGENT_SOURCES + OPERATOR_SOURCES):
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
                assert call.func.attr != "request", f"{path.relative_to(REPO)}:{call.lineno} calls request()"


def test_every_shared_kube_helper_that_calls_the_api_is_counted():
    """The tables read the agent's and operator's packages plus the kube helpers that call the API for
    them; a new helper that calls the API must join the sources above (or the tables miss its calls)."""
    verbs = "|".join(METHOD_VERBS)
    calling = {path.name for path in (PACKAGE / "kube").glob("*.py")
               if re.search(rf"\bclient\.({verbs})\(", path.read_text())}
    # client.py defines the verbs; reflector.py's list and watch are the informers counted above
    assert calling - {"client.py", "reflector.py"} == {"events.py", "leaderelection.py"}


# -- what RBAC cannot say: the cluster-wide agent writes only checkpoint objects -----------------------------
VAP_API = "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy"
WRITE_OPERATIONS = {"create": "CREATE", "update": "UPDATE", "patch": "UPDATE", "delete": "DELETE"}


def policy_objects(helm, **values) -> list[dict]:
    return helm.template(SNAPSHOT_CHART, namespace="infra", api_versions=[VAP_API],
                         values={"storage.accessMode": "podMount", **values})


def test_a_cluster_wide_agent_may_write_only_pods_jobs_and_leases_labelled_with_a_checkpoint_id(helm):
    objects = policy_objects(helm)
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["metadata"]["name"].endswith("-infra"), "cluster-scoped names carry the namespace"
    sa = next(o for o in objects if o["kind"] == "ServiceAccount")["metadata"]
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f"request.userInfo.username == 'system:serviceaccount:infra:{sa['name']}'"
    assert sum(f"'{names.LABEL_CHECKPOINT_ID}' in " in v["expression"] for v in policy["spec"]["validations"]) == 2
    # every write the ClusterRole grants passes through the policy, its Events included
    matched = {(g, r, op) for rule in policy["spec"]["matchConstraints"]["resourceRules"]
               for g in rule["apiGroups"] for r in rule["resources"] for op in rule["operations"]}
    (role,) = roles(objects)
    writes = {(g, r, WRITE_OPERATIONS[v]) for g, r, v in grants(role["rules"]) if v in WRITE_OPERATIONS}
    assert writes and writes <= matched


def test_the_agents_policy_lets_it_change_only_annotations_of_pods_and_jobs_and_write_only_its_own_events(helm):
    (policy,) = [o for o in policy_objects(helm) if o["kind"] == "ValidatingAdmissionPolicy"]
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    for field in ("object.spec == oldObject.spec", "object.metadata.labels == oldObject.metadata.labels",
                  "object.metadata.finalizers", "object.metadata.ownerReferences"):
        assert field in variables["onlyAnnotations"]
    (annotations_only,) = [v for v in policy["spec"]["validations"] if "variables.onlyAnnotations" in v["expression"]]
    assert "'leases'" in annotations_only["expression"], "a Lease's renewal rewrites its spec: not held to it"
    # the reporting controller the agent's EventRecorder writes (agent/service/main.py)
    (own_events,) = [v for v in policy["spec"]["validations"] if "reportingController" in v["expression"]]
    assert own_events["expression"].count(f"== '{agent_main.EVENT_CONTROLLER}'") == 2  # the new and the old event


@pytest.mark.parametrize(("values", "api_versions"), [
    ({"storage.accessMode": "podMount"}, []),  # a cluster without the API (before 1.30)
    ({"storage.accessMode": "podMount", "admissionPolicy.checkpointObjectsOnly": "false"}, [VAP_API]),
    ({"storage.accessMode": "podMount", "rbac.namespaceRestricted": "true"}, [VAP_API]),  # a Role suffices
    ({"storage.pvc.size": "1Ti"}, [VAP_API]),  # agentMount: restricted by default
])
def test_no_label_policy_where_the_cluster_lacks_the_api_it_is_off_or_a_role_suffices(helm, values, api_versions):
    objects = helm.template(SNAPSHOT_CHART, namespace="infra", values=values, api_versions=api_versions)
    assert not [o for o in objects if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_requiring_the_label_policy_on_a_cluster_without_the_api_fails_naming_the_value(helm):
    error = helm.template_error(SNAPSHOT_CHART, values={"storage.accessMode": "podMount",
                                                        "admissionPolicy.checkpointObjectsOnly": "true"})
    assert "admissionPolicy.checkpointObjectsOnly" in error and "1.30" in error
