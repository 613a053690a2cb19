"""The checkpoint Job's shape (controllers/checkpoint/job.py and podshape.py): labels, owner, finalizer,
the source pod's probes and mounts, snapshot-init as PID 1, a missing target container named."""


import pytest

from dynamo_snapshot.api import OperatorConfig, names, parse_config
from dynamo_snapshot.controllers.checkpoint.ids import job_name
from dynamo_snapshot.controllers.checkpoint.job import OUTCOME_FINALIZER, build_checkpoint_job
from dynamo_snapshot.controllers.podshape import MissingContainer
from dynamo_snapshot.controllers.storage import (
    Storage,
    resolve_storage,
)
from tests.controllers.support import decoded_checkpoint as ckpt_

READY_PROBE = ["sh", "-c", "cat /snapshot-control/ready-for-snapshot 2>/dev/null "
               "|| cat /snapshot-control/ready-for-checkpoint"]


def test_job_shape():
    storage = Storage(mode=OperatorConfig().checkpoint.storage.access_mode, pvc_name="snapshot-pvc",
                      base_path="/checkpoints")
    job = build_checkpoint_job(ckpt_(), name=job_name("abc", "1"), checkpoint_id="abc", artifact_version="1",
                               storage=storage)
    assert job["metadata"]["name"] == "checkpoint-job-abc-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert OUTCOME_FINALIZER in job["metadata"]["finalizers"]
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 300
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"] == {names.LABEL_CHECKPOINT_ID: "abc", names.LABEL_IS_CHECKPOINT_SOURCE: "true"}
    assert pod["metadata"]["annotations"][names.ANN_TARGET_CONTAINERS] == "main"
    assert pod["metadata"]["annotations"][names.ANN_ARTIFACT_VERSION] == "1"
    assert pod["spec"]["restartPolicy"] == "Never"
    main, sidecar = pod["spec"]["containers"]
    assert main["readinessProbe"] == {"exec": {"command": READY_PROBE},
                                      "periodSeconds": 1, "failureThreshold": 3}
    assert "livenessProbe" not in main and "startupProbe" not in main
    assert {"name": "snapshot-control", "mountPath": "/snapshot-control", "subPath": "main"} in main["volumeMounts"]
    assert {"name": "DYN_SNAPSHOT_CONTROL_DIR", "value": "/snapshot-control"} in main["env"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert "checkpoint-storage" not in volumes  # agentMount: the pod never mounts the PVC
    assert "volumeMounts" not in sidecar


def test_a_command_keeps_snapshot_init_as_pid_1():
    ckpt = ckpt_()
    ckpt.spec.job.pod_template_spec["spec"]["containers"][0]["command"] = ["python3", "-m", "dynamo.vllm"]
    job = build_checkpoint_job(ckpt, name="j", checkpoint_id="abc", artifact_version="1", storage=None)
    main, sidecar = job["spec"]["template"]["spec"]["containers"]
    assert main["command"] == ["/usr/local/bin/snapshot-init", "--", "python3", "-m", "dynamo.vllm"]
    assert "command" not in sidecar
    # without a command the image's entrypoint (snapshot-init) runs: nothing to add
    assert "command" not in build_checkpoint_job(ckpt_(), name="j", checkpoint_id="abc", artifact_version="1",
                                                 storage=None)["spec"]["template"]["spec"]["containers"][0]


def test_pod_mount_job_mounts_the_pvc_at_base_path():
    config = parse_config("checkpoint: {enabled: true, storage: {accessMode: podMount}}")
    storage = resolve_storage("ns", config, pvc_names=["snapshot-pvc"])
    job = build_checkpoint_job(ckpt_(), name="j", checkpoint_id="abc", artifact_version="1", storage=storage)
    main = job["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "checkpoint-storage", "mountPath": "/checkpoints"} in main["volumeMounts"]


def test_missing_target_container_names_the_field():
    ckpt = ckpt_()
    ckpt.spec.job.target_container_name = "worker"
    with pytest.raises(MissingContainer, match=r"spec\.job\.targetContainerName: no container named 'worker'"):
        build_checkpoint_job(ckpt, name="j", checkpoint_id="abc", artifact_version="1", storage=None)


def test_s3_storage_needs_no_pvc_and_stamps_the_storage_type():
    config = parse_config("checkpoint: {enabled: true, storage: {type: s3, accessMode: podMount, "
                          "pvc: {create: true, size: 1Ti}, s3: {bucket: ckpts, prefix: fleet/a}}}")
    storage = resolve_storage("ns", config)  # no agent DaemonSet, no PVC in the namespace
    assert (storage.type, storage.location("abc")) == ("s3", "s3://ckpts/fleet/a/abc")
    job = build_checkpoint_job(ckpt_(), name="j", checkpoint_id="abc", artifact_version="1", storage=storage)
    pod = job["spec"]["template"]
    assert "checkpoint-storage" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert pod["metadata"]["annotations"][names.ANN_STORAGE_TYPE] == "s3"
    assert names.ANN_STORAGE_BASE_PATH not in pod["metadata"]["annotations"]
