"""Where a Ready checkpoint is pre-staged: pure decisions over the Nodes and the pod specs that restore from it.

    consumers   the pod specs that will restore from the checkpoint (the restore-shaped templates of the
                DGD generations that name its checkpoint ID)
    fits        a node can run such a pod: schedulable and Ready, every NoSchedule/NoExecute taint
                tolerated, the nodeSelector and the required node affinity satisfied, the GPUs it asks for
                allocatable, and the GPU model and driver of the checkpoint's own node (when known)
    choose      the nodes where at least one consumer fits, capped: nodes chosen before and still fitting
                first (a staged copy is not thrown away for a rename), then by name

Only what the scheduler is certain to refuse is ruled out; what it weighs (preferred affinity, spread, free
capacity now) is not: a staged copy on a node the pod does not land on costs disk, not correctness.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dynamo_snapshot.api import StagingGPU, names

NO_SCHEDULE_EFFECTS = ("NoSchedule", "NoExecute")


@dataclass(frozen=True)
class NodeView:
    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...] = ()
    allocatable: Mapping[str, str] = field(default_factory=dict)
    schedulable: bool = True
    ready: bool = True

    @classmethod
    def of(cls, node: Mapping[str, Any]) -> NodeView:
        meta, spec, status = node.get("metadata", {}), node.get("spec", {}), node.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        return cls(meta.get("name", ""), meta.get("labels") or {}, tuple(spec.get("taints") or ()),
                   status.get("allocatable") or {}, not spec.get("unschedulable", False), ready)

    def driver_version(self) -> str:
        if full := self.labels.get(names.NODE_LABEL_DRIVER_VERSION):
            return full
        parts = [self.labels.get(label, "") for label in names.NODE_LABELS_DRIVER_PARTS]
        return ".".join(parts) if all(parts) else ""


def gpu_of(node: NodeView) -> StagingGPU | None:
    """The GPU record of the node a checkpoint was taken on (None when its labels say nothing)."""
    product, driver = node.labels.get(names.NODE_LABEL_GPU_PRODUCT, ""), node.driver_version()
    return StagingGPU(product=product, driver_version=driver) if product or driver else None


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    operator = toleration.get("operator", "Equal")
    if not toleration.get("key"):
        return operator == "Exists"  # an empty key with Exists tolerates everything
    if toleration["key"] != taint.get("key"):
        return False
    return operator == "Exists" or toleration.get("value", "") == taint.get("value", "")


def _untolerated(node: NodeView, tolerations: list[Mapping[str, Any]]) -> list[str]:
    return [f"{t.get('key')}={t.get('value', '')}:{t.get('effect')}" for t in node.taints
            if t.get("effect") in NO_SCHEDULE_EFFECTS and not any(_tolerates(o, t) for o in tolerations)]


def _number(value: str) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _expression_holds(expr: Mapping[str, Any], value: str | None) -> bool:
    operator, values = expr.get("operator"), expr.get("values") or []
    if operator == "In":
        return value is not None and value in values
    if operator == "NotIn":
        return value is None or value not in values
    if operator == "Exists":
        return value is not None
    if operator == "DoesNotExist":
        return value is None
    if operator in ("Gt", "Lt") and value is not None and len(values) == 1:
        have, bound = _number(value), _number(values[0])
        if have is None or bound is None:
            return False
        return have > bound if operator == "Gt" else have < bound
    return False


def _term_holds(term: Mapping[str, Any], node: NodeView) -> bool:
    expressions, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    if not expressions and not fields:
        return False  # an empty term matches no node (the scheduler's rule)
    return (all(_expression_holds(e, node.labels.get(e.get("key", ""))) for e in expressions)
            and all(_expression_holds(f, node.name if f.get("key") == "metadata.name" else None) for f in fields))


def _required_affinity(spec: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {})
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    return None if required is None else list(required.get("nodeSelectorTerms") or [])


def _gpus_asked(spec: Mapping[str, Any]) -> int:
    total = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        asked = (resources.get("limits") or {}).get(names.RESOURCE_GPU) or (resources.get("requests") or {}).get(
            names.RESOURCE_GPU)
        if asked is not None:
            total += _number(str(asked)) or 0
    return total


def _gpu_mismatch(node: NodeView, gpu: StagingGPU | None) -> str | None:
    if gpu is None:
        return None
    product, driver = node.labels.get(names.NODE_LABEL_GPU_PRODUCT, ""), node.driver_version()
    if gpu.product and product and product != gpu.product:
        return f"GPU {product}, the checkpoint's is {gpu.product}"
    if gpu.driver_version and driver and driver != gpu.driver_version:
        return f"driver {driver}, the checkpoint's is {gpu.driver_version}"
    return None


def why_not(node: NodeView, spec: Mapping[str, Any], gpu: StagingGPU | None = None) -> str | None:
    """Why a pod of ``spec`` cannot run on ``node`` (None: it can), in words naming the field."""
    if not node.schedulable:
        return "the node is cordoned (spec.unschedulable)"
    if not node.ready:
        return "the node is not Ready"
    if untolerated := _untolerated(node, list(spec.get("tolerations") or [])):
        return f"taints not tolerated: {', '.join(untolerated)}"
    for key, value in (spec.get("nodeSelector") or {}).items():
        if node.labels.get(key) != value:
            return f"nodeSelector {key}={value}"
    terms = _required_affinity(spec)
    if terms is not None and not any(_term_holds(term, node) for term in terms):
        return "required node affinity"
    asked = _gpus_asked(spec)
    if asked and (_number(str(node.allocatable.get(names.RESOURCE_GPU, "0"))) or 0) < asked:
        return f"{asked} x {names.RESOURCE_GPU} asked, not allocatable there"
    return _gpu_mismatch(node, gpu)


def choose_nodes(consumers: Iterable[Mapping[str, Any]], nodes: Iterable[NodeView], *, limit: int,
                 gpu: StagingGPU | None = None, previous: Iterable[str] = ()) -> list[str]:
    """At most ``limit`` nodes where a pod of one of ``consumers`` (pod specs) can run, sorted by name;
    those of ``previous`` that still fit are kept first."""
    specs = list(consumers)
    if limit <= 0 or not specs:
        return []
    fitting = {n.name for n in nodes if n.name and any(why_not(n, spec, gpu) is None for spec in specs)}
    kept = sorted(fitting & set(previous))[:limit]
    rest = sorted(fitting - set(kept))[:limit - len(kept)]
    return sorted(kept + rest)
