"""The snapshot chart rendered by the real helm: the agent DaemonSet's contract with the agent and the
operator in each storage mode, runtime, RBAC scope and OpenShift, and values refused with a clear error."""

import base64
import json
import subprocess

import pytest
import yaml

from dynamo_snapshot.agent.service import config as agent_config
from dynamo_snapshot.api import OperatorConfig
from dynamo_snapshot.controllers.storage import StorageUnavailable, resolve_storage
from dynamo_snapshot.devcluster.stack import AGENT_RULES, CACHE_RULES

from .conftest import SNAPSHOT_CHART, kinds, only

SIZE = {"storage.pvc.size": "1Ti"}
MODES = {
    "agentMount": SIZE,
    "agentMount-existing-pvc": {"storage.pvc.create": "false", "storage.pvc.name": "existing"},
    "podMount": {"storage.accessMode": "podMount"},
    "crio-openshift": {**SIZE, "runtime.type": "crio", "openshift.enabled": "true"},
    "podMount-restricted": {"storage.accessMode": "podMount", "rbac.namespaceRestricted": "true"},
    "agentMount-node-cache": {**SIZE, "cache.hostPath": "/mnt/nvme/snapshot-cache", "cache.budgetGiB": 100},
    "s3": {"storage.type": "s3", "storage.s3.bucket": "ckpts", "storage.s3.credentialsSecret": "s3-creds",
           "cache.budgetGiB": 500},
}


def render(helm, **values):
    return helm.template(SNAPSHOT_CHART, namespace="gpu-workers", values=values)


def agent(objects) -> dict:
    ds = only(objects, "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "agent"
    return container


def agent_config_map(objects) -> dict:
    """The agent's configuration ConfigMap (the other one, with seccomp.deploy, holds the seccomp profile)."""
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config")]
    return config


def mounts(objects) -> dict[str, tuple[str, dict]]:
    """volume name -> (mount path in the agent, volume source)."""
    ds = only(objects, "DaemonSet")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    return {m["name"]: (m["mountPath"], volumes[m["name"]]) for m in agent(objects)["volumeMounts"]}


@pytest.mark.parametrize("mode", MODES)
def test_lint_passes_in_every_mode(helm, mode):
    helm.run("lint", "--strict", str(SNAPSHOT_CHART), *helm.set_args(MODES[mode]))


def test_agent_mount_daemonset_is_the_agent_contract(helm):
    objects = render(helm, **SIZE)
    assert kinds(objects) == ["ConfigMap", "ConfigMap", "DaemonSet", "PersistentVolumeClaim", "Role", "RoleBinding",
                              "Secret", "ServiceAccount"]
    ds = only(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["labels"]["app.kubernetes.io/component"] == "snapshot-agent"
    assert pod["hostPID"] is True
    assert pod["serviceAccountName"] == only(objects, "ServiceAccount")["metadata"]["name"]
    container = agent(objects)
    assert container["securityContext"] == {"privileged": True}
    assert container["command"] == [
        "snapshot-agent", "--node-name=$(NODE_NAME)", "--namespace=$(POD_NAMESPACE)", "--namespace-restricted",
        "--runtime-type=containerd", "--runtime-socket=/run/containerd/containerd.sock",
        "--storage-access-mode=agentMount", "--storage-base-path=/checkpoints", "--host-proc=/host/proc",
        "--config=/etc/snapshot-agent/config.yaml", "--metrics-bind-address=:9090",
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAMESPACE": "metadata.namespace"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    vols = mounts(objects)
    assert vols["runtime-socket"] == ("/run/containerd",
                                      {"name": "runtime-socket", "hostPath": {"path": "/run/containerd",
                                                                              "type": "Directory"}})
    assert vols["host-proc"][0] == "/host/proc" and vols["host-proc"][1]["hostPath"]["path"] == "/proc"
    assert vols["cgroup"][0] == "/sys/fs/cgroup" and vols["cgroup"][1]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert vols["checkpoints"] == ("/checkpoints",
                                   {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "snapshot-pvc"}})

    pvc = only(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "snapshot-pvc"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert "storageClassName" not in pvc["spec"], "empty storageClass must mean the cluster default"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_operator_discovers_the_chart_storage(helm):
    """The operator's agentMount rule (DaemonSet label, container `agent`, PVC volume `checkpoints`) finds
    exactly the PVC and base path the chart was installed with."""
    objects = render(helm, **SIZE, **{"storage.pvc.name": "ckpt-store", "storage.pvc.basePath": "/data/ckpts/",
                                      "storage.pvc.storageClass": "fast-rwx"})
    storage = resolve_storage("gpu-workers", OperatorConfig(), daemonsets=[only(objects, "DaemonSet")])
    assert (storage.pvc_name, storage.base_path, storage.pod_mount) == ("ckpt-store", "/data/ckpts", False)
    assert "--storage-base-path=/data/ckpts" in agent(objects)["command"]
    pvc = only(objects, "PersistentVolumeClaim")
    assert (pvc["metadata"]["name"], pvc["spec"]["storageClassName"]) == ("ckpt-store", "fast-rwx")


def test_existing_pvc_is_mounted_not_created(helm):
    objects = render(helm, **{"storage.pvc.create": "false", "storage.pvc.name": "team-checkpoints"})
    assert "PersistentVolumeClaim" not in kinds(objects)
    storage = resolve_storage("gpu-workers", OperatorConfig(), daemonsets=[only(objects, "DaemonSet")])
    assert storage.pvc_name == "team-checkpoints"


def test_pod_mount_creates_and_mounts_no_pvc(helm):
    # create=true and a size stay harmless: in podMount the operator owns the workload PVCs.
    objects = render(helm, **SIZE, **{"storage.accessMode": "podMount", "storage.pvc.basePath": "/ckpt"})
    assert "PersistentVolumeClaim" not in kinds(objects)
    assert "checkpoints" not in mounts(objects)
    command = agent(objects)["command"]
    assert "--storage-access-mode=podMount" in command and "--storage-base-path=/ckpt" in command
    # One agent for the cluster: it needs cluster-wide RBAC and is not confined to its namespace.
    assert {"ClusterRole", "ClusterRoleBinding"} <= set(kinds(objects)) and "Role" not in kinds(objects)
    assert "--namespace-restricted" not in command
    # An operator left in agentMount mode against this install says what is wrong instead of guessing.
    with pytest.raises(StorageUnavailable, match="does not mount a PVC-backed checkpoint volume"):
        resolve_storage("gpu-workers", OperatorConfig(), daemonsets=[only(objects, "DaemonSet")])


@pytest.mark.parametrize(("values", "socket"), [
    ({"runtime.type": "crio"}, "/var/run/crio/crio.sock"),
    ({"runtime.type": "containerd", "runtime.socketPath": "/run/k3s/containerd/containerd.sock"},
     "/run/k3s/containerd/containerd.sock"),
])
def test_runtime_socket(helm, values, socket):
    objects = render(helm, **SIZE, **values)
    command = agent(objects)["command"]
    assert f"--runtime-type={values['runtime.type']}" in command
    assert f"--runtime-socket={socket}" in command
    socket_dir = socket.rsplit("/", 1)[0]
    path, volume = mounts(objects)["runtime-socket"]
    assert path == socket_dir and volume["hostPath"]["path"] == socket_dir


SCC_RULE = {"apiGroups": ["security.openshift.io"], "resources": ["securitycontextconstraints"],
            "resourceNames": ["privileged"], "verbs": ["use"]}


@pytest.mark.parametrize("mode", ["agentMount", "podMount"])
def test_openshift_grants_the_privileged_scc(helm, mode):
    objects = render(helm, **SIZE, **{"storage.accessMode": mode, "openshift.enabled": "true"})
    role = next(o for o in objects if o["kind"] in ("Role", "ClusterRole"))
    assert SCC_RULE in role["rules"]
    assert SCC_RULE not in next(o for o in render(helm, **SIZE, **{"storage.accessMode": mode})
                                if o["kind"] in ("Role", "ClusterRole"))["rules"]


@pytest.mark.parametrize(("mode", "restricted", "expect_restricted"), [
    ("agentMount", None, True),
    ("agentMount", "false", False),
    ("podMount", None, False),
    ("podMount", "true", True),
])
def test_rbac_scope(helm, mode, restricted, expect_restricted):
    values = {**SIZE, "storage.accessMode": mode}
    if restricted is not None:
        values["rbac.namespaceRestricted"] = restricted
    objects = render(helm, **values)
    rbac = [o for o in objects if o["apiVersion"].startswith("rbac.")]
    command = agent(objects)["command"]
    if expect_restricted:
        assert kinds(rbac) == ["Role", "RoleBinding"]
        assert all(o["metadata"]["namespace"] == "gpu-workers" for o in rbac)
        assert "--namespace-restricted" in command
    else:
        assert kinds(rbac) == ["ClusterRole", "ClusterRoleBinding"]
        # Installs in several namespaces under one release name must not fight over cluster-scoped names.
        assert all(o["metadata"]["name"].endswith("-gpu-workers") for o in rbac)
        assert "--namespace-restricted" not in command
    binding = next(o for o in rbac if o["kind"].endswith("Binding"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": only(objects, "ServiceAccount")["metadata"]
                                    ["name"], "namespace": "gpu-workers"}]


def test_criu_config_reaches_the_agent_and_rolls_it(helm, tmp_path):
    default = render(helm, **SIZE)
    tuned = render(helm, **SIZE, **{"config.criu.networkLock": "nftables", "config.criu.logLevel": 2,
                                    "config.criu.extraArgs": "{--skip-in-flight}"})
    config = yaml.safe_load(agent_config_map(tuned)["data"]["config.yaml"])
    for rendered in (default, tuned):  # what the chart renders is what the agent accepts
        text = agent_config_map(rendered)["data"]["config.yaml"]
        (tmp_path / "config.yaml").write_text(text)
        agent_config.load(tmp_path / "config.yaml")
    assert config["restore"] == {"prefetchThreads": 8}
    assert config["criu"]["networkLock"] == "nftables"
    assert config["criu"]["logLevel"] == 2
    assert config["criu"]["extraArgs"] == ["--skip-in-flight"]
    path, volume = mounts(tuned)["config"]
    assert path == "/etc/snapshot-agent" and volume["configMap"]["name"] == agent_config_map(tuned)["metadata"]["name"]
    checksum = [only(o, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for o in (default, tuned)]
    assert checksum[0] != checksum[1], "a config change must roll the agent pods"


@pytest.mark.parametrize(("values", "names"), [
    ({"storage.pvc.size": ""}, "storage.pvc.size"),
    ({"storage.accessMode": "hostMount", **SIZE}, "storage.accessMode"),
    ({"storage.type": "oci", **SIZE}, "storage.type must be pvc or s3"),
    ({"storage.type": "s3"}, "storage.s3.bucket is required"),
    ({"storage.type": "s3", "storage.s3.bucket": "b1b", "storage.accessMode": "podMount", "cache.budgetGiB": 9},
     "storage.accessMode"),
    ({"storage.type": "s3", "storage.s3.bucket": "b1b", "storage.s3.localDirectory": "objs", "cache.budgetGiB": 9},
     "storage.s3.localDirectory"),
    ({"storage.type": "s3", "storage.s3.bucket": "b1b"}, "cache.budgetGiB is required with storage.type=s3"),
    ({"storage.type": "s3", "storage.s3.bucket": "b1b", "cache.budgetGiB": 9,
      "cache.hostPath": "/var/lib/dynamo-snapshot/objects/cache"}, "cache.hostPath \"/var/lib/dynamo-snapshot/objects/"
                                                                  "cache\" overlaps storage.s3.localDirectory"),
    ({"storage.type": "s3", "storage.s3.bucket": "b1b", "cache.budgetGiB": 9, "cache.hostPath": "/mnt/nvme/c",
      "storage.s3.localDirectory": "/var/lib/dynamo-snapshot"},
     "storage.s3.localDirectory \"/var/lib/dynamo-snapshot\" overlaps"),
    ({"runtime.type": "docker", **SIZE}, "runtime.type"),
    ({"storage.pvc.basePath": "checkpoints", **SIZE}, "storage.pvc.basePath"),
    ({"storage.pvc.accessMode": "ReadOnlyMany", **SIZE}, "storage.pvc.accessMode"),
    ({"storage.pvc.create": "false", "storage.pvc.name": ""}, "storage.pvc.name"),
    ({"rbac.namespaceRestricted": "sometimes", **SIZE}, "rbac.namespaceRestricted"),
    ({"cache.hostPath": "/mnt/nvme/cache", **SIZE}, "cache.budgetGiB is 0"),
    ({"cache.budgetGiB": 100, **SIZE}, "cache.hostPath is empty"),
    ({"cache.hostPath": "cache", "cache.budgetGiB": 100, **SIZE}, "cache.hostPath must be an absolute directory"),
    ({"cache.hostPath": "/c", "cache.budgetGiB": "lots", **SIZE}, "cache.budgetGiB must be a number of GiB"),
    ({"cache.hostPath": "/c", "cache.budgetGiB": -1, **SIZE}, "cache.budgetGiB must be 0"),
    ({"config.cache.dir": "/c", **SIZE}, "use cache.hostPath and cache.budgetGiB"),
    ({"config.storage.type": "s3", **SIZE}, "use storage.type and storage.s3"),
])
def test_bad_values_fail_naming_the_value(helm, values, names):
    assert names in helm.template_error(SNAPSHOT_CHART, values=values)


@pytest.mark.parametrize("mode", ["agentMount", "podMount"])
def test_the_node_cache_is_a_host_path_mounted_only_into_the_agent_and_configured_there(helm, mode, tmp_path):
    off = render(helm, **MODES[mode])
    assert "node-cache" not in mounts(off)
    assert "cache" not in yaml.safe_load(agent_config_map(off)["data"]["config.yaml"])
    on = render(helm, **MODES[mode], **{"cache.hostPath": "/mnt/nvme/snapshot-cache/", "cache.budgetGiB": 200})
    path, volume = mounts(on)["node-cache"]
    assert volume["hostPath"] == {"path": "/mnt/nvme/snapshot-cache", "type": "DirectoryOrCreate"}
    text = agent_config_map(on)["data"]["config.yaml"]
    assert yaml.safe_load(text)["cache"] == {"dir": path, "budgetGiB": 200}
    (tmp_path / "config.yaml").write_text(text)  # what the chart renders is what the agent accepts
    assert agent_config.load(tmp_path / "config.yaml").cache == agent_config.CacheSettings(path, 200 << 30)
    pod = only(on, "DaemonSet")["spec"]["template"]["spec"]
    # no container of its own: only the seccomp profile's installer (seccomp.deploy) runs before the agent
    assert [c["name"] for c in pod["containers"]] == ["agent"]
    assert [c["name"] for c in pod["initContainers"]] == ["deploy-seccomp"]


def test_s3_storage_configures_the_agent_for_the_bucket_with_the_secret_and_mounts_no_pvc(helm, tmp_path):
    objects = render(helm, **MODES["s3"], **{"storage.s3.prefix": "fleet/a", "storage.s3.forcePathStyle": "true",
                                              "storage.s3.endpoint": "https://minio.storage:9000",
                                              "storage.s3.caConfigMap": "s3-ca", "storage.pvc.size": "1Ti"})
    assert "PersistentVolumeClaim" not in kinds(objects)
    vols = mounts(objects)
    assert "checkpoints" not in vols
    assert vols["objects"] == ("/var/lib/dynamo-snapshot/objects", {"name": "objects", "hostPath": {
        "path": "/var/lib/dynamo-snapshot/objects", "type": "DirectoryOrCreate"}})
    assert vols["s3-ca"][1]["configMap"] == {"name": "s3-ca"}
    container = agent(objects)
    assert "--storage-base-path=/var/lib/dynamo-snapshot/objects" in container["command"]
    assert "--namespace-restricted" not in container["command"]  # one agent serves every namespace
    assert {"ClusterRole", "ClusterRoleBinding"} <= set(kinds(objects))
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                  if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env == {
        "AWS_ACCESS_KEY_ID": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "s3-creds", "key": "AWS_SESSION_TOKEN", "optional": True}}
    # What the chart renders is what the agent accepts, and means the bucket, prefix and endpoint given.
    (tmp_path / "config.yaml").write_text(agent_config_map(objects)["data"]["config.yaml"])
    s3 = agent_config.load(tmp_path / "config.yaml").storage.s3
    assert s3 is not None and (s3.bucket, s3.prefix, s3.endpoint, s3.force_path_style) == (
        "ckpts", "fleet/a", "https://minio.storage:9000", True)
    assert s3.ca_bundle == "/etc/dynamo-snapshot/s3-ca/ca.crt" and s3.ca_bundle.startswith(vols["s3-ca"][0])
    # restores fetch into the node cache: on with s3, on its default host path, within the budget given
    assert vols["node-cache"][1]["hostPath"] == {"path": "/var/lib/dynamo-snapshot/cache", "type": "DirectoryOrCreate"}
    assert agent_config.load(tmp_path / "config.yaml").cache == agent_config.CacheSettings(vols["node-cache"][0],
                                                                                           500 << 30)


def test_size_error_says_how_to_reuse_an_existing_pvc(helm):
    error = helm.template_error(SNAPSHOT_CHART, values={"storage.pvc.size": ""})
    assert "storage.pvc.create=false" in error and "storage.pvc.name" in error



def test_the_local_stack_grants_its_agent_what_the_chart_grants(helm):
    """`make run` and the e2e suite run the agent with rules of their own (no helm at run time); they
    must be the chart's, or the local runs prove an agent the chart would not allow."""
    role = next(o for o in render(helm, **SIZE) if o["kind"] in ("Role", "ClusterRole"))
    assert role["rules"] == AGENT_RULES
    # with the node cache on (the pre-staging module's stack): the read-only watch of DynamoCheckpoints too
    cached = render(helm, **SIZE, **{"cache.hostPath": "/mnt/nvme/cache", "cache.budgetGiB": 1})
    role = next(o for o in cached if o["kind"] in ("Role", "ClusterRole"))
    assert role["rules"] == AGENT_RULES + CACHE_RULES


def test_the_checkpoint_keys_are_a_kept_secret_mounted_only_into_the_agent(helm):
    objects = render(helm, **SIZE)
    secret = only(objects, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (key,) = secret["data"].values()
    assert len(base64.b64decode(key)) >= 32
    path, volume = mounts(objects)["keys"]
    assert path == "/etc/dynamo-snapshot/keys"
    assert volume["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}
    reuse = render(helm, **SIZE, **{"keys.create": "false", "keys.secretName": "my-keys"})
    assert "Secret" not in kinds(reuse)
    assert mounts(reuse)["keys"][1]["secret"]["secretName"] == "my-keys"


def seccomp_installer(objects) -> dict:
    (init,) = only(objects, "DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    return init


def test_the_seccomp_profile_is_deployed_by_default_as_upstream(helm):
    objects = render(helm, **SIZE)
    profiles = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-seccomp"))
    profile = json.loads(profiles["data"]["block-iouring.json"])
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    (rule,) = profile["syscalls"]
    assert sorted(rule["names"]) == ["io_uring_enter", "io_uring_register", "io_uring_setup"]
    assert rule["action"] == "SCMP_ACT_ERRNO"
    init = seccomp_installer(objects)
    assert init["image"] == agent(objects)["image"] and init["imagePullPolicy"] == "IfNotPresent"
    pod = only(objects, "DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    source = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert volumes["seccomp-profiles"]["configMap"]["name"] == profiles["metadata"]["name"]
    assert volumes["host-seccomp"]["hostPath"] == {"path": "/var/lib/kubelet/seccomp", "type": "DirectoryOrCreate"}
    assert set(source) == {"seccomp-profiles", "host-seccomp"}
    assert "host-seccomp" not in mounts(objects), "only the init container writes the node's seccomp root"


def test_the_seccomp_installer_puts_the_profile_where_the_kubelet_reads_it(helm, tmp_path):
    """The init container's own command, run here against a copy of its two mounts."""
    objects = render(helm, **SIZE)
    init = seccomp_installer(objects)
    configmap, node = tmp_path / "configmap", tmp_path / "node-seccomp"
    configmap.mkdir()
    node.mkdir()
    profiles = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-seccomp"))
    (configmap / "block-iouring.json").write_text(profiles["data"]["block-iouring.json"])
    paths = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    script = init["command"][2].replace(paths["seccomp-profiles"], str(configmap)) \
        .replace(paths["host-seccomp"], str(node))
    for _ in range(2):  # a restarted agent pod installs it again over the old one
        subprocess.run([*init["command"][:2], script], check=True, timeout=30)
    assert sorted(p.name for p in (node / "profiles").iterdir()) == ["block-iouring.json"]
    assert json.loads((node / "profiles" / "block-iouring.json").read_text()) == \
        json.loads(profiles["data"]["block-iouring.json"])


def test_seccomp_deploy_false_renders_no_profile_and_no_installer(helm):
    objects = render(helm, **SIZE, **{"seccomp.deploy": "false"})
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"] == [
        agent_config_map(objects)["metadata"]["name"]]
    pod = only(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert "initContainers" not in pod and "host-seccomp" not in {v["name"] for v in pod["volumes"]}
    assert "checksum/seccomp" not in only(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]


def test_the_seccomp_installer_image_can_be_set_as_upstream_names_it(helm):
    objects = render(helm, **SIZE, **{"daemonset.initContainer.image": "busybox:1.36",
                                      "daemonset.initContainer.imagePullPolicy": "Always"})
    init = seccomp_installer(objects)
    assert (init["image"], init["imagePullPolicy"]) == ("busybox:1.36", "Always")


def test_a_kubelet_with_another_root_dir_gets_the_profile_in_its_own_seccomp_root(helm):
    objects = render(helm, **SIZE, **{"seccomp.hostPath": "/data/kubelet/seccomp/"})
    volumes = {v["name"]: v for v in only(objects, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["host-seccomp"]["hostPath"]["path"] == "/data/kubelet/seccomp"
    error = helm.template_error(SNAPSHOT_CHART, values={**SIZE, "seccomp.hostPath": "relative/seccomp"})
    assert "seccomp.hostPath must be the kubelet's seccomp directory" in error
