"""Where checkpoint storage is (controllers/storage.py): the agent DaemonSet's PVC in agentMount mode,
the namespace's PVC in podMount mode, and the errors that name what is missing."""

import datetime as dt

import pytest

from dynamo_snapshot.api import OperatorConfig, parse_config
from dynamo_snapshot.controllers.storage import (
    Storage,
    StorageNotReady,
    StorageUnavailable,
    resolve_storage,
)

NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.UTC)

def _agent_ds(volume=True):
    volumes = [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ckpt-pvc"}}] if volume else []
    return {"metadata": {"name": "snapshot-agent", "labels": {"app.kubernetes.io/component": "snapshot-agent"}},
            "spec": {"template": {"spec": {"volumes": volumes, "containers": [
                {"name": "agent", "volumeMounts": [{"name": "checkpoints", "mountPath": "/data/ckpt"}]}]}}}}


def test_agent_mount_storage_discovery():
    config = OperatorConfig()
    assert resolve_storage("ns", config, daemonsets=[_agent_ds()]) == Storage(
        config.checkpoint.storage.access_mode, "ckpt-pvc", "/data/ckpt")
    with pytest.raises(StorageUnavailable, match=r"^no snapshot-agent daemonset found in namespace ns$"):
        resolve_storage("ns", config, daemonsets=[])
    with pytest.raises(StorageUnavailable, match="does not mount a PVC-backed checkpoint volume"):
        resolve_storage("ns", config, daemonsets=[_agent_ds(volume=False)])


def test_pod_mount_storage_missing_pvc():
    config = parse_config("checkpoint: {storage: {accessMode: podMount}}")
    with pytest.raises(StorageUnavailable) as err:
        resolve_storage("ns", config, pvc_names=[])
    assert str(err.value) == (
        "checkpoint storage PVC ns/snapshot-pvc does not exist and checkpoint.storage.pvc.create is false")
    creating = parse_config("checkpoint: {storage: {accessMode: podMount, pvc: {create: true, size: 10Gi}}}")
    with pytest.raises(StorageNotReady):
        resolve_storage("ns", creating, pvc_names=[])


@pytest.mark.parametrize(("text", "field"), [
    ("checkpoint: {storage: {type: s3}}", r"checkpoint.storage.s3.bucket: '' is not a bucket name"),
    ("checkpoint: {storage: {type: s3, s3: {bucket: Bad_Name}}}", "checkpoint.storage.s3.bucket"),
    ("checkpoint: {storage: {type: s3, s3: {bucket: ok1, prefix: a//b}}}", "checkpoint.storage.s3.prefix"),
    ("checkpoint: {storage: {type: s3, s3: {bucket: ok1, region: x}}}", "checkpoint.storage.s3.region"),
    ("checkpoint: {storage: {type: oci}}", "checkpoint.storage.type"),
])
def test_a_wrong_s3_setting_is_refused_naming_it(text, field):
    from dynamo_snapshot.api import InvalidObject

    with pytest.raises(InvalidObject, match=field):
        parse_config(text)


def test_s3_storage_is_the_configured_bucket_wherever_the_agents_are():
    config = parse_config("checkpoint: {storage: {type: s3, s3: {bucket: ckpts}}}")
    storage = resolve_storage("team-a", config)
    assert (storage.type, storage.pvc_name, storage.pod_mount, storage.location("ck1")) == (
        "s3", "", False, "s3://ckpts/ck1")
