"""Validation of the Pod manifests snapshotctl is given, before anything touches a cluster."""

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
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected exactly one object (a Pod), found {len(documents)}")
    pod = documents[0]
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
        return Path(path).read_text()
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror}") from None


def parse_container_list(value: str, flag: str) -> list[str]:
    containers = [c.strip() for c in value.split(",") if c.strip()]
    if not containers:
        raise ManifestError(f"{flag}: name at least one container")
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
    regex = re.compile(pattern)
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
