"""Pod templates shaped for checkpoint (the Job's source pod) and for restore (SPEC sections 4 and 5).

Pure functions over plain dicts: they take the user's template and return a new one, never mutating input.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from dynamo_snapshot.api import names
from dynamo_snapshot.controllers.storage import STORAGE_TYPE_PVC, Storage

SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
CHECKPOINT_PVC_VOLUME = "checkpoint-storage"
RESTORE_STARTUP_FAILURE_THRESHOLD = 3600  # one hour at period 1 s: a large image restores slowly, not never

Template = dict[str, Any]


class MissingContainer(ValueError):
    def __init__(self, container: str, available: list[str], field: str):
        self.container = container
        super().__init__(
            f"{field}: no container named {container!r} in the pod template "
            f"(containers: {', '.join(available) or 'none'})"
        )


def containers_named(spec: dict[str, Any], wanted: Iterable[str], field: str) -> list[dict[str, Any]]:
    by_name = {c.get("name"): c for c in spec.get("containers", [])}
    found = []
    for name in wanted:
        if name not in by_name:
            raise MissingContainer(name, [n for n in by_name if n], field)
        found.append(by_name[name])
    return found


def _set_volume(spec: dict[str, Any], volume: dict[str, Any]) -> None:
    volumes = [v for v in spec.get("volumes", []) if v.get("name") != volume["name"]]
    spec["volumes"] = [*volumes, volume]


def _set_mount(container: dict[str, Any], mount: dict[str, Any]) -> None:
    mounts = [
        m for m in container.get("volumeMounts", [])
        if m.get("name") != mount["name"] and m.get("mountPath") != mount["mountPath"]
    ]
    container["volumeMounts"] = [*mounts, mount]


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env", []) if e.get("name") != name]
    container["env"] = [*env, {"name": name, "value": value}]


def _keep_init_first(container: dict[str, Any]) -> None:
    """A pod's `command` replaces the image's entrypoint, which in a placeholder image is snapshot-init:
    put it back in front, so snapshot-init is PID 1 of every checkpoint source and restore pod (the
    checkpointed subtree is the workload under it). Without `command`, the entrypoint already is."""
    command = container.get("command")
    if command and command[0] not in (names.SNAPSHOT_INIT_PATH, "snapshot-init"):
        container["command"] = [names.SNAPSHOT_INIT_PATH, "--", *command]


def _add_control_dir(spec: dict[str, Any], containers: list[dict[str, Any]]) -> None:
    _set_volume(spec, {"name": names.CONTROL_VOLUME, "emptyDir": {}})
    for container in containers:
        # One subdirectory per container, so two checkpointed containers never see each other's sentinels.
        _set_mount(container, {"name": names.CONTROL_VOLUME, "mountPath": names.CONTROL_DIR,
                               "subPath": container["name"]})
        _set_env(container, names.ENV_CONTROL_DIR, names.CONTROL_DIR)


def _add_shared_memory(spec: dict[str, Any], containers: list[dict[str, Any]], size: str) -> None:
    _set_volume(spec, {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": size}})
    for container in containers:
        _set_mount(container, {"name": SHM_VOLUME, "mountPath": SHM_PATH})


def _add_storage(spec: dict[str, Any], containers: list[dict[str, Any]], storage: Storage | None) -> None:
    if storage is None or not storage.pod_mount:
        return
    _set_volume(spec, {"name": CHECKPOINT_PVC_VOLUME, "persistentVolumeClaim": {"claimName": storage.pvc_name}})
    for container in containers:
        _set_mount(container, {"name": CHECKPOINT_PVC_VOLUME, "mountPath": storage.base_path})


def _stamp_metadata(
    template: Template, checkpoint_id: str, artifact_version: str, targets: list[str], storage: Storage | None
) -> dict[str, Any]:
    meta = template.setdefault("metadata", {})
    meta.setdefault("labels", {})[names.LABEL_CHECKPOINT_ID] = checkpoint_id
    annotations = meta.setdefault("annotations", {})
    annotations[names.ANN_ARTIFACT_VERSION] = artifact_version
    annotations[names.ANN_TARGET_CONTAINERS] = ",".join(targets)
    if storage is not None:
        annotations[names.ANN_STORAGE_TYPE] = storage.type
        if storage.type == STORAGE_TYPE_PVC:
            annotations[names.ANN_STORAGE_BASE_PATH] = storage.base_path
    return meta


def _exec_probe(path: str, period: int = 1, failure_threshold: int = 3) -> dict[str, Any]:
    return {"exec": {"command": ["cat", path]}, "periodSeconds": period, "failureThreshold": failure_threshold}


def _ready_probe() -> dict[str, Any]:
    """Ready when the worker wrote ready-for-snapshot, or the guide-era ready-for-checkpoint."""
    current, legacy = (f"{names.CONTROL_DIR}/{f}" for f in (names.FILE_READY_FOR_SNAPSHOT,
                                                             names.FILE_READY_FOR_CHECKPOINT_LEGACY))
    probe = _exec_probe(current)
    probe["exec"]["command"] = ["sh", "-c", f"cat {current} 2>/dev/null || cat {legacy}"]
    return probe


def checkpoint_source_template(
    template: Template,
    *,
    target: str,
    checkpoint_id: str,
    artifact_version: str,
    shared_memory: str,
    storage: Storage | None,
) -> Template:
    """The checkpoint Job's pod: the user's pod plus the control directory, the readiness gate on
    `ready-for-snapshot`, no liveness/startup probes (a quiesced worker must not be restarted), /dev/shm,
    and in podMount mode the checkpoint PVC."""
    shaped = copy.deepcopy(template)
    spec = shaped.setdefault("spec", {})
    (container,) = containers_named(spec, [target], "spec.job.targetContainerName")
    meta = _stamp_metadata(shaped, checkpoint_id, artifact_version, [target], storage)
    meta["labels"][names.LABEL_IS_CHECKPOINT_SOURCE] = "true"
    spec["restartPolicy"] = "Never"
    _add_control_dir(spec, [container])
    _add_shared_memory(spec, [container], shared_memory)
    _add_storage(spec, [container], storage)
    _keep_init_first(container)
    container["readinessProbe"] = _ready_probe()
    container.pop("livenessProbe", None)
    container.pop("startupProbe", None)
    return shaped


def restore_template(
    template: Template,
    *,
    targets: list[str],
    checkpoint_id: str,
    artifact_version: str,
    storage: Storage | None,
    field: str = "checkpoint target",
    cold_fallback: bool = False,
) -> Template:
    """A pod that restores `targets` from the checkpoint: snapshot-init waits in standby for the agent,
    and the startup probe holds traffic until the restored workload says it is live. `cold_fallback`
    (startupPolicy Immediate): when the agent refuses the restore for good, snapshot-init starts the
    workload cold, and the startup probe lets it through as it would a cold pod."""
    shaped = copy.deepcopy(template)
    spec = shaped.setdefault("spec", {})
    containers = containers_named(spec, targets, field)
    _stamp_metadata(shaped, checkpoint_id, artifact_version, targets, storage)
    shaped["metadata"]["labels"].pop(names.LABEL_IS_CHECKPOINT_SOURCE, None)
    _add_control_dir(spec, containers)
    _add_storage(spec, containers, storage)
    for container in containers:
        _keep_init_first(container)
        _set_env(container, names.ENV_RESTORE_STANDBY, "1")
        if cold_fallback:
            _set_env(container, names.ENV_RESTORE_FALLBACK, names.RESTORE_FALLBACK_COLD)
        own = container.get("startupProbe")
        if own:
            container["startupProbe"] = {**own, "periodSeconds": 1,
                                         "failureThreshold": RESTORE_STARTUP_FAILURE_THRESHOLD}
        else:
            container["startupProbe"] = _restore_probe(cold_fallback)
    return shaped


def _restore_probe(cold_fallback: bool) -> dict[str, Any]:
    """Started once restored; with the cold fallback also once the restore was refused (cold start)."""
    restored = f"{names.CONTROL_DIR}/{names.FILE_RESTORE_COMPLETE}"
    probe = _exec_probe(restored, failure_threshold=RESTORE_STARTUP_FAILURE_THRESHOLD)
    if cold_fallback:
        refused = f"{names.CONTROL_DIR}/{names.FILE_RESTORE_FAILED}"
        probe["exec"]["command"] = ["sh", "-c", f"cat {restored} 2>/dev/null || cat {refused}"]
    return probe


def shared_memory_volume(template: Template, containers: list[str], size: str) -> Template:
    """/dev/shm as a memory emptyDir of `size` on `containers` (cold and restored workers alike)."""
    shaped = copy.deepcopy(template)
    spec = shaped.setdefault("spec", {})
    _add_shared_memory(spec, containers_named(spec, containers, "containers"), size)
    return shaped
