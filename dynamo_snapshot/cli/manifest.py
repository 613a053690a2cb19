"""Validation of the Pod manifests and flags snapshotctl is given, before anything touches a cluster.

In order: read the file (unreadable or not UTF-8: named), YAML (too deep: named), one Pod object, the
shape of every field snapshotctl or the pod shaping reads (types named by their path), then the flags
(IDs, names, paths, the placeholder pattern) - each refusal names the field or flag and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dynamo_snapshot.api import names

DEFAULT_PLACEHOLDER_PATTERN = r"placeholder"


class ManifestError(ValueError):
    """The manifest or the flags cannot work; the message says what and how to fix it."""


def load_pod(path: str) -> dict[str, Any]:
    text = _read(path)
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from None
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be a Pod manifest") from None
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected exactly one object (a Pod), found {len(documents)}")
    pod = documents[0]
    if isinstance(pod, dict):
        check_pod_shape(pod, path)
    if not isinstance(pod, dict):
        raise ManifestError(f"{path}: expected a Pod object, found {type(pod).__name__}")
    if pod.get("kind") != "Pod" or pod.get("apiVersion", "v1") != "v1":
        raise ManifestError(f"{path}: kind is {pod.get('kind')!r}; snapshotctl needs a Pod manifest (apiVersion v1, "
                            "kind Pod) - for a Deployment or a DGD use the operator instead")
    if not (pod.get("spec") or {}).get("containers"):
        raise ManifestError(f"{path}: spec.containers is empty")
    return pod


def _read(path: str) -> str:
    if path == "-":
        import sys

        return sys.stdin.read()
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start}); a manifest is YAML") from None
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror or err}") from None


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(f"{where}: expected {what}, got {type(value).__name__}")
    return value


def _string_map(value: Any, where: str) -> None:
    for key, item in _expect(value, dict, where, "a mapping of strings").items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise ManifestError(f"{where}: expected a mapping of strings, got {key!r}: {type(item).__name__}"
                                " (quote values such as \"true\" or \"1\")")


def _list_of_objects(value: Any, where: str) -> list[dict[str, Any]]:
    for index, item in enumerate(_expect(value, list, where, "a list")):
        _expect(item, dict, f"{where}[{index}]", "an object")
    return value


def _container_shape(container: dict[str, Any], where: str) -> None:
    _expect(container.get("name"), str, f"{where}.name", "a string")
    for key in ("image", "imagePullPolicy", "workingDir"):
        if container.get(key) is not None:
            _expect(container[key], str, f"{where}.{key}", "a string")
    for key in ("command", "args"):
        for index, item in enumerate(_expect(container.get(key) or [], list, f"{where}.{key}", "a list")):
            _expect(item, str, f"{where}.{key}[{index}]", "a string")
    for key in ("env", "volumeMounts", "ports", "envFrom"):
        for index, item in enumerate(_list_of_objects(container.get(key) or [], f"{where}.{key}")):
            if key in ("env", "volumeMounts"):
                field = "name" if key == "env" else "mountPath"
                _expect(item.get(field), str, f"{where}.{key}[{index}].{field}", "a string")
            if key == "env" and item.get("value") is not None:
                _expect(item["value"], str, f"{where}.env[{index}].value", "a string (quote numbers)")
    for key in ("resources", "securityContext", "readinessProbe", "livenessProbe", "startupProbe"):
        if container.get(key) is not None:
            _expect(container[key], dict, f"{where}.{key}", "an object")


def check_pod_shape(pod: dict[str, Any], path: str) -> None:
    """The types of every field snapshotctl and the pod shaping read, named by their path."""
    for key in pod:
        if not isinstance(key, str):
            raise ManifestError(f"{path}: field names must be strings, got {key!r}")
    for key in ("kind", "apiVersion"):
        if pod.get(key) is not None:
            _expect(pod[key], str, f"{path}: {key}", "a string")
    meta = pod["metadata"] = _expect(pod.get("metadata") or {}, dict, f"{path}: metadata", "an object")
    for key in ("name", "namespace", "generateName"):
        if meta.get(key) is not None:
            _expect(meta[key], str, f"{path}: metadata.{key}", "a string")
    for key in ("labels", "annotations"):
        if meta.get(key) is not None:
            _string_map(meta[key], f"{path}: metadata.{key}")
    spec = pod["spec"] = _expect(pod.get("spec") or {}, dict, f"{path}: spec", "an object")
    for key in ("containers", "initContainers", "volumes"):
        for index, item in enumerate(_list_of_objects(spec.get(key) or [], f"{path}: spec.{key}")):
            if key == "volumes":
                _expect(item.get("name"), str, f"{path}: spec.volumes[{index}].name", "a string")
            else:
                _container_shape(item, f"{path}: spec.{key}[{index}]")
    if spec.get("nodeSelector") is not None:
        _string_map(spec["nodeSelector"], f"{path}: spec.nodeSelector")


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
# <basePath>/<checkpointID>/... and the Job checkpoint-job-<ID>-<version> (63 characters at most)
MAX_CHECKPOINT_ID = 63 - len("checkpoint-job--") - len(names.DEFAULT_ARTIFACT_VERSION)
RESERVED_IDS = {names.STAGING_DIR, names.VERSIONS_DIR}


def check_name(value: str, flag: str, *, limit: int = 63) -> str:
    if not DNS_LABEL.match(value) or len(value) > limit:
        raise ManifestError(f"{flag}: {value!r} is not a valid name (lower-case letters, digits and '-', "
                            f"starting and ending with a letter or digit, at most {limit} characters)")
    return value


def check_checkpoint_id(value: str, flag: str = "--checkpoint-id") -> str:
    check_name(value, flag, limit=MAX_CHECKPOINT_ID)
    if value in RESERVED_IDS:
        raise ManifestError(f"{flag}: {value!r} is reserved by the storage layout ({', '.join(sorted(RESERVED_IDS))}"
                            "); choose another ID")
    return value


def check_base_path(value: str, flag: str = "--base-path") -> str:
    parts = value.split("/")
    if not value.startswith("/") or ".." in parts or "." in parts or value.rstrip("/") == "" or "\0" in value:
        raise ManifestError(f"{flag}: {value!r} must be an absolute directory other than / without '.' or '..' "
                            "(e.g. /checkpoints)")
    return value.rstrip("/")


def check_quantity(value: str, flag: str) -> str:
    if not QUANTITY.match(value):
        raise ManifestError(f"{flag}: {value!r} is not a Kubernetes quantity (e.g. 8Gi)")
    return value


def check_pattern(pattern: str, flag: str = "--placeholder-pattern") -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as err:
        raise ManifestError(f"{flag}: {pattern!r} is not a regular expression: {err}") from None


def parse_container_list(value: str, flag: str) -> list[str]:
    containers = [c.strip() for c in value.split(",") if c.strip()]
    if not containers:
        raise ManifestError(f"{flag}: name at least one container")
    for container in containers:
        check_name(container, flag)
    if len(set(containers)) != len(containers):
        raise ManifestError(f"{flag}: {value!r} names a container twice")
    return containers


def require_containers(pod: dict[str, Any], wanted: list[str], flag: str) -> list[dict[str, Any]]:
    by_name = {c.get("name"): c for c in pod["spec"]["containers"]}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise ManifestError(f"{flag}: no container named {', '.join(map(repr, missing))} in the pod "
                            f"(containers: {', '.join(n for n in by_name if n)})")
    return [by_name[w] for w in wanted]


def require_placeholder(containers: list[dict[str, Any]], pattern: str) -> None:
    """Each target must run the placeholder image (CRIU, the restore tooling, snapshot-init): recognised by
    the image name matching `pattern`, or by a command that starts snapshot-init."""
    regex = check_pattern(pattern)
    for container in containers:
        image = container.get("image") or ""
        command = container.get("command") or []
        if regex.search(image) or (command and command[0].endswith("snapshot-init")):
            continue
        raise ManifestError(
            f"container {container.get('name')!r}: image {image!r} is not a placeholder image (it must wrap the "
            f"runtime image with CRIU, the restore tooling and snapshot-init; names matching {pattern!r} are "
            "recognised - use --placeholder-pattern for your naming)")


def require_agreement(pod: dict[str, Any], *, checkpoint_id: str | None, containers: list[str]) -> str | None:
    """Snapshot metadata already in the manifest must agree with the flags: a disagreement is refused, never
    silently resolved. Returns the manifest's own checkpoint ID, if it has one."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    own_id = labels.get(names.LABEL_CHECKPOINT_ID)
    if own_id and checkpoint_id and own_id != checkpoint_id:
        raise ManifestError(f"the manifest's label {names.LABEL_CHECKPOINT_ID}={own_id} disagrees with "
                            f"--checkpoint-id {checkpoint_id}: remove one of them")
    targets = annotations.get(names.ANN_TARGET_CONTAINERS)
    if own_id is not None:
        check_checkpoint_id(own_id, f"the manifest's label {names.LABEL_CHECKPOINT_ID}")
    if targets is not None:
        listed = [t.strip() for t in targets.split(",") if t.strip()]
        if sorted(listed) != sorted(containers):
            raise ManifestError(f"the manifest's annotation {names.ANN_TARGET_CONTAINERS}={targets} disagrees with "
                                f"the containers given ({','.join(containers)}): remove one of them")
    return own_id


def pod_template(pod: dict[str, Any]) -> dict[str, Any]:
    """A Pod manifest as a pod template: its labels, annotations and spec."""
    meta = pod.get("metadata") or {}
    template_meta = {k: meta[k] for k in ("labels", "annotations") if meta.get(k)}
    return {"metadata": template_meta, "spec": pod["spec"]}
