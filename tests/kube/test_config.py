"""Configuration: kubeconfig files (paths and embedded data, merged lists, contexts), exec plugins, and the
in-cluster service account - the last two proven against the real API server with a real token."""

from __future__ import annotations

import base64
import json
import stat
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.kube import Client, ConfigError, Resource, load_config, load_in_cluster, load_kubeconfig

SELF_SUBJECT_REVIEWS = Resource("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview",
                                namespaced=False)


def write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def kubeconfig_doc(cluster: dict, user: dict, *, name: str = "c", namespace: str | None = None) -> dict:
    context = {"cluster": name, "user": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": cluster}], "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": context}]}


def test_relative_paths_are_relative_to_the_kubeconfig(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_bytes(b"CA")
    (tmp_path / "pki" / "tls.crt").write_bytes(b"CERT")
    (tmp_path / "pki" / "tls.key").write_bytes(b"KEY")
    path = write(tmp_path / "config", kubeconfig_doc(
        {"server": "https://k8s.example:6443/", "certificate-authority": "pki/ca.crt"},
        {"client-certificate": "pki/tls.crt", "client-key": "pki/tls.key"}, namespace="team"))
    config = load_kubeconfig(path)
    assert (config.server, config.ca_data, config.client_cert_data, config.client_key_data, config.namespace) == \
        ("https://k8s.example:6443", b"CA", b"CERT", b"KEY", "team")


def test_kubeconfig_list_merges_first_wins_and_contexts_select(tmp_path, monkeypatch):
    first = write(tmp_path / "a", kubeconfig_doc({"server": "https://a"}, {"token": "ta"}, name="a"))
    second_doc = kubeconfig_doc({"server": "https://b"}, {"token": "tb"}, name="b")
    second_doc["clusters"].append({"name": "a", "cluster": {"server": "https://shadowed"}})
    second = write(tmp_path / "b", second_doc)
    monkeypatch.setenv("KUBECONFIG", f"{first}:{second}")
    assert (load_config().server, load_config().token) == ("https://a", "ta")
    assert load_config(context="b").server == "https://b"
    with pytest.raises(ConfigError, match="context 'nope' not found"):
        load_config(context="nope")


def test_unsupported_and_missing_configuration_is_a_clear_error(tmp_path, monkeypatch):
    path = write(tmp_path / "c", kubeconfig_doc({"server": "https://x"}, {"auth-provider": {"name": "gcp"}}))
    with pytest.raises(ConfigError, match="auth-provider is not supported"):
        load_kubeconfig(path)
    with pytest.raises(ConfigError, match="no kubeconfig"):
        load_kubeconfig(tmp_path / "missing")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no cluster configuration"):
        load_config()


async def _service_account_token(client: Client, namespace: str) -> str:
    await client.create(Resource("", "v1", "serviceaccounts", "ServiceAccount"),
                        {"metadata": {"name": "robot"}}, namespace)
    review = await client.create(Resource("", "v1", "serviceaccounts"), {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 600},
    }, namespace, name="robot", subresource="token")
    return review["status"]["token"]


async def _whoami(client: Client) -> str:
    review = await client.create(SELF_SUBJECT_REVIEWS, {"apiVersion": "authentication.k8s.io/v1",
                                                        "kind": "SelfSubjectReview"})
    return review["status"]["userInfo"]["username"]


@pytest.mark.integration
@pytest.mark.anyio
async def test_in_cluster_service_account(client, cluster_config, namespace, tmp_path, monkeypatch):
    token = await _service_account_token(client, namespace)
    (tmp_path / "token").write_text(token)
    (tmp_path / "ca.crt").write_bytes(cluster_config.ca_data or b"")
    (tmp_path / "namespace").write_text(namespace)
    host, port = cluster_config.server.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    config = load_in_cluster(tmp_path)
    assert config.namespace == namespace
    async with Client(config) as sa_client:
        assert await _whoami(sa_client) == f"system:serviceaccount:{namespace}:robot"


@pytest.mark.integration
@pytest.mark.anyio
async def test_exec_credential_plugin(client, cluster_config, namespace, tmp_path):
    token = await _service_account_token(client, namespace)
    plugin = tmp_path / "plugin.py"
    credential = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": token, "expirationTimestamp": "2999-01-01T00:00:00Z"}}
    plugin.write_text(f"import json, os\nassert json.loads(os.environ['KUBERNETES_EXEC_INFO'])['kind']"
                      f" == 'ExecCredential'\nprint(json.dumps({credential!r}))\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    path = write(tmp_path / "config", kubeconfig_doc(
        {"server": cluster_config.server,
         "certificate-authority-data": base64.b64encode(cluster_config.ca_data or b"").decode()},
        {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                  "args": [str(plugin)], "interactiveMode": "Never"}}))
    async with Client.from_config(path) as exec_client:
        assert await _whoami(exec_client) == f"system:serviceaccount:{namespace}:robot"
    assert json.loads(json.dumps(credential))  # the plugin's output is plain JSON
