"""snapshotctl: checkpoint and restore pods without the operator (needs the snapshot chart's agent).

    snapshotctl checkpoint --manifest pod.yaml --container NAME [--checkpoint-id ID] [--namespace NS] [--no-wait]
    snapshotctl restore --manifest pod.yaml --checkpoint-id ID --containers a,b
    snapshotctl restore --pod NAME --checkpoint-id ID [--containers a,b]

(`-f`/`--filename` is the same as upstream's `--manifest`.) Stages: parse the flags, `plan` (the manifest
and every flag checked, once - nothing has touched a cluster yet), connect, then the command.
Exit codes: 0 done, 1 the cluster refused or could not be reached, 2 bad manifest or flags, 3 the
checkpoint failed, 4 the wait timed out. Output: upstream's `key=value` lines, or `-o json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio

from dynamo_snapshot import logs
from dynamo_snapshot.api import OperatorConfig, StorageAccessMode, names
from dynamo_snapshot.cli.manifest import (
    DEFAULT_PLACEHOLDER_PATTERN,
    ManifestError,
    check_base_path,
    check_checkpoint_id,
    check_name,
    check_pattern,
    check_quantity,
    load_pod,
    parse_container_list,
    pod_template,
    require_agreement,
    require_containers,
    require_placeholder,
)
from dynamo_snapshot.controllers.checkpoint.ids import job_name
from dynamo_snapshot.controllers.checkpoint.job import checkpoint_job
from dynamo_snapshot.controllers.checkpoint.outcome import job_condition
from dynamo_snapshot.controllers.common import DAEMONSETS
from dynamo_snapshot.controllers.podshape import restore_template
from dynamo_snapshot.controllers.storage import Storage, StorageUnavailable, resolve_storage
from dynamo_snapshot.kube import JOBS, PODS, AlreadyExists, Client, ConfigError, Informer, KubeError, NotFound
from dynamo_snapshot.kube.podfailure import describe_pod_failure, explain_killed_pod

EXIT_OK, EXIT_CLUSTER, EXIT_USAGE, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 2, 3, 4
DEFAULT_SHARED_MEMORY = "8Gi"
DEFAULT_DEADLINE = 3600
DEFAULT_WAIT = 45 * 60.0  # upstream's --timeout


@dataclass
class Outcome:
    fields: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    code: int = EXIT_OK


def _new_checkpoint_id() -> str:
    return secrets.token_hex(8)  # 16 hex characters, like a legacy identity hash


async def _storage(client: Client, namespace: str, args: argparse.Namespace) -> Storage:
    """The chart's storage resolution: `--pvc`/`--base-path` for podMount, else the namespace's agent."""
    if args.pvc:
        return Storage(StorageAccessMode.POD_MOUNT, args.pvc, args.base_path)
    agents = await client.list(DAEMONSETS, namespace,
                               label_selector=f"{names.LABEL_APP_COMPONENT}={names.AGENT_COMPONENT}")
    try:
        return resolve_storage(namespace, OperatorConfig(), daemonsets=agents.items)
    except StorageUnavailable as err:
        raise ManifestError(f"{err}: install the snapshot chart in {namespace} (snapshotctl needs its agent), "
                            "or pass --pvc and --base-path for podMount storage") from None


# -- checkpoint ---------------------------------------------------------------------------------------------
def _annotated_verdict(job: dict[str, Any]) -> str | None:
    """The snapshot agent's result on the Job, if it recorded one."""
    annotation = (job.get("metadata", {}).get("annotations") or {}).get(names.ANN_CHECKPOINT_STATUS)
    return annotation if annotation in (names.STATUS_COMPLETED, names.STATUS_FAILED) else None


def _verdict(job: dict[str, Any] | None) -> str | None:
    if job is None:
        return None
    if annotation := _annotated_verdict(job):
        return annotation
    if job_condition(job, names.JOB_FAILED):
        return names.STATUS_FAILED
    return None


def failure_detail(job: dict[str, Any] | None, pods: list[dict[str, Any]], target: str) -> str:
    """Why the checkpoint failed, from the Job and its pods: a pod killed (SIGKILL, OOM) before the agent
    recorded a result in the operator's words (kube/podfailure.py), else the pod's own reason."""
    failed = job_condition(job, names.JOB_FAILED) if job is not None else None
    if job is not None and failed and _annotated_verdict(job) is None:
        meta = job["metadata"]
        retry = (f"run snapshotctl checkpoint again with another --checkpoint-id (or delete Job "
                 f"{meta.get('namespace')}/{meta['name']} first to reuse this one)")
        killed = explain_killed_pod(
            pods, target, job_failure_reason=failed.get("reason"), retry=retry,
            memory_limit_field=f"spec.containers[{target}].resources.limits.memory in the pod manifest")
        if killed:
            return killed
    return describe_pod_failure(pods, target)


async def _wait_for_job(client: Client, namespace: str, name: str, target: str,
                        say: Any) -> tuple[str | None, str]:
    """Watch the Job (and its pod, for progress) until the agent's verdict or the Job's failure; the
    caller bounds the wait. Returns the verdict (None when cancelled) and the pod's failure reason."""
    jobs: Informer[Any] = Informer(client, JOBS, namespace=namespace, field_selector=f"metadata.name={name}")
    pods: Informer[Any] = Informer(client, PODS, namespace=namespace,
                                   label_selector=f"{names.LABEL_JOB_NAME}={name}")
    seen: set[str] = set()

    def progress(pod: dict[str, Any]) -> None:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        line = f"pod {pod['metadata']['name']}: {status.get('phase', 'Pending')}" + \
            (" (ready for snapshot: the agent is checkpointing)" if ready else "")
        if line not in seen:
            seen.add(line)
            say(line)

    pods.add_handler(on_add=progress, on_update=lambda _old, new: progress(new))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(jobs.run)
            tg.start_soon(pods.run)
            await jobs.wait_until(lambda: _verdict(jobs.store.get_by_name(namespace, name)) is not None)
            tg.cancel_scope.cancel()
    finally:
        job = jobs.store.get_by_name(namespace, name)
        verdict = _verdict(job)
        detail = failure_detail(job, pods.store.list(), target)
    return verdict, detail


async def checkpoint(client: Client, args: argparse.Namespace, plan: Plan, namespace: str) -> Outcome:
    pod, (target,), checkpoint_id = plan.pod, plan.containers, plan.checkpoint_id
    assert pod is not None
    storage = await _storage(client, namespace, args)
    name = job_name(checkpoint_id, names.DEFAULT_ARTIFACT_VERSION)
    body = checkpoint_job(
        name=name, namespace=namespace, pod_template=pod_template(pod), target=target,
        checkpoint_id=checkpoint_id, artifact_version=names.DEFAULT_ARTIFACT_VERSION,
        shared_memory=args.shared_memory, active_deadline_seconds=args.active_deadline_seconds, storage=storage)
    try:
        await client.create(JOBS, body, namespace, field_manager="snapshotctl")
    except AlreadyExists:
        raise ManifestError(f"Job {namespace}/{name} already exists: checkpoint ID {checkpoint_id} is taken "
                            "(delete the Job or choose another --checkpoint-id)") from None
    location = storage.location(checkpoint_id)
    outcome = Outcome({"checkpointID": checkpoint_id, "job": name, "namespace": namespace})
    status, detail = "created", ""
    if args.wait:
        verdict = None
        with anyio.move_on_after(args.timeout):
            verdict, detail = await _wait_for_job(client, namespace, name, target,
                                                  say=lambda line: print(line, file=sys.stderr, flush=True))
        status = outcome.fields["status"] = verdict or "timeout"
        outcome.code = {names.STATUS_COMPLETED: EXIT_OK, names.STATUS_FAILED: EXIT_FAILED}.get(status, EXIT_TIMEOUT)
        if status == "timeout":
            detail = f"not finished after {args.timeout:.0f}s"
    # upstream's output: key=value lines
    outcome.lines = [f"status={status}", f"namespace={namespace}", f"name={pod['metadata'].get('name', '')}",
                     f"checkpoint_job={name}", f"checkpoint_id={checkpoint_id}", f"checkpoint_location={location}"]
    if detail:
        outcome.lines.append(f"message={detail}")
    return outcome


# -- restore -------------------------------------------------------------------------------------------------
def _restore_lines(namespace: str, pod: str, checkpoint_id: str, storage: Storage | None) -> list[str]:
    """Upstream's output: key=value lines (the restore is requested, not waited for)."""
    location = storage.location(checkpoint_id) if storage else ""
    return ["status=requested", f"namespace={namespace}", f"name={pod}", f"restore_pod={pod}",
            f"checkpoint_id={checkpoint_id}", f"checkpoint_location={location}"]


async def restore_new_pod(client: Client, args: argparse.Namespace, plan: Plan, namespace: str) -> Outcome:
    pod, containers = plan.pod, plan.containers
    assert pod is not None
    storage = await _storage(client, namespace, args)
    shaped = restore_template(pod_template(pod), targets=containers, checkpoint_id=args.checkpoint_id,
                              artifact_version=names.DEFAULT_ARTIFACT_VERSION, storage=storage,
                              field="--containers")
    body = {"apiVersion": "v1", "kind": "Pod",
            "metadata": {**(pod.get("metadata") or {}), **shaped["metadata"], "namespace": namespace},
            "spec": shaped["spec"]}
    body["metadata"].pop("resourceVersion", None)
    if not body["metadata"].get("name") and not body["metadata"].get("generateName"):
        body["metadata"]["generateName"] = f"restore-{args.checkpoint_id[:16]}-"
    created = await client.create(PODS, body, namespace, field_manager="snapshotctl")
    name = created["metadata"]["name"]
    return Outcome({"pod": name, "namespace": namespace, "checkpointID": args.checkpoint_id},
                   _restore_lines(namespace, name, args.checkpoint_id, storage))


def existing_pod_targets(pod: dict[str, Any], containers_flag: str | None) -> list[str]:
    """The containers `restore --pod` restores: `--containers` when given, else (as upstream) the pod's
    target-containers annotation. Each must be a container of the pod."""
    name = (pod.get("metadata") or {}).get("name", "")
    if containers_flag is not None:
        containers = parse_container_list(containers_flag, "--containers")
        require_containers(pod, containers, "--containers")
        return containers
    annotation = ((pod.get("metadata") or {}).get("annotations") or {}).get(names.ANN_TARGET_CONTAINERS)
    if annotation is None:
        raise ManifestError(f"--containers: required (or annotate pod {name} with {names.ANN_TARGET_CONTAINERS})")
    where = f"pod {name}, annotation {names.ANN_TARGET_CONTAINERS}={annotation!r}"
    listed = [c.strip() for c in annotation.split(",") if c.strip()]
    if not listed:
        raise ManifestError(f"{where}: names no container (annotate it with the containers to restore, or "
                            "pass --containers)")
    if len(set(listed)) != len(listed):
        raise ManifestError(f"{where}: names a container twice (fix the annotation, or pass --containers)")
    known = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
    unknown = [c for c in listed if c not in known]
    if unknown:
        raise ManifestError(f"{where}: no container named {', '.join(map(repr, unknown))} in the pod "
                            f"(containers: {', '.join(n for n in known if n)}); fix the annotation, or pass "
                            "--containers")
    return listed


async def restore_existing_pod(client: Client, args: argparse.Namespace, plan: Plan, namespace: str) -> Outcome:
    try:
        pod = await client.get(PODS, args.pod, namespace)
    except NotFound:
        raise ManifestError(f"--pod: no pod {namespace}/{args.pod}") from None
    containers = existing_pod_targets(pod, args.containers)
    targets = require_containers(pod, containers, "--containers")
    require_placeholder(targets, args.placeholder_pattern)  # as for a manifest: the image must wrap the tooling
    for container in targets:
        env = {e.get("name"): e.get("value") for e in container.get("env") or []}
        mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
        if env.get(names.ENV_RESTORE_STANDBY) != "1" or names.CONTROL_DIR not in mounts:
            raise ManifestError(
                f"pod {args.pod}, container {container['name']}: not snapshot-compatible (needs env "
                f"{names.ENV_RESTORE_STANDBY}=1 and the {names.CONTROL_DIR} volume); create it with "
                "`snapshotctl restore -f` instead")
    require_agreement(pod, checkpoint_id=args.checkpoint_id, containers=containers)
    patch = {"metadata": {
        "resourceVersion": pod["metadata"]["resourceVersion"],
        "labels": {names.LABEL_CHECKPOINT_ID: args.checkpoint_id},
        "annotations": {names.ANN_TARGET_CONTAINERS: ",".join(containers),
                        names.ANN_ARTIFACT_VERSION: names.DEFAULT_ARTIFACT_VERSION},
    }}
    await client.patch(PODS, args.pod, patch, namespace)
    return Outcome({"pod": args.pod, "namespace": namespace, "checkpointID": args.checkpoint_id},
                   _restore_lines(namespace, args.pod, args.checkpoint_id, None))


# -- entry point ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What the flags and the manifest ask for, checked once before any cluster is contacted."""

    pod: dict[str, Any] | None
    containers: list[str]
    checkpoint_id: str


def _targets(flag_value: str | None, pod: dict[str, Any] | None, flag: str) -> str:
    """The flag, else (as upstream) the manifest's target-containers annotation."""
    if flag_value is not None:
        return flag_value
    annotation = ((pod or {}).get("metadata") or {}).get("annotations", {}).get(names.ANN_TARGET_CONTAINERS)
    if annotation is None:
        raise ManifestError(f"{flag}: required (or annotate the manifest with {names.ANN_TARGET_CONTAINERS})")
    return annotation


def plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no cluster: the flags, the manifest, and their agreement."""
    check_pattern(args.placeholder_pattern)
    args.base_path = check_base_path(args.base_path)
    for flag, value in (("--pvc", args.pvc), ("--namespace", args.namespace), ("--pod", getattr(args, "pod", None))):
        if value is not None:
            check_name(value, flag, limit=253 if flag != "--namespace" else 63)
    if args.checkpoint_id is not None:
        check_checkpoint_id(args.checkpoint_id)
    pod = load_pod(args.filename) if getattr(args, "filename", None) else None
    if pod is not None and args.namespace and pod.get("metadata", {}).get("namespace") not in (None, args.namespace):
        raise ManifestError(f"the manifest's namespace {pod['metadata']['namespace']} disagrees with "
                            f"--namespace {args.namespace}: remove one of them")
    if args.command == "checkpoint":
        check_quantity(args.shared_memory, "--shared-memory")
        if not args.timeout > 0 or args.timeout != args.timeout:
            raise ManifestError(f"--timeout: {args.timeout} must be a positive number of seconds")
        if args.active_deadline_seconds < 1:
            raise ManifestError(f"--active-deadline-seconds: {args.active_deadline_seconds} must be at least 1")
        assert pod is not None  # argparse requires the manifest
        containers = parse_container_list(_targets(args.container, pod, "--container"), "--container")
        if len(containers) != 1:
            raise ManifestError("--container: name exactly one container to checkpoint")
        targets = require_containers(pod, containers, "--container")
        own_id = require_agreement(pod, checkpoint_id=args.checkpoint_id, containers=containers)
        require_placeholder(targets, args.placeholder_pattern)
        return Plan(pod, containers, args.checkpoint_id or own_id or _new_checkpoint_id())
    if (pod is None) == (args.pod is None):
        raise ManifestError("restore: give either --manifest pod.yaml (a new restore pod) or --pod NAME "
                            "(an existing one)")
    if pod is None:  # --pod: the containers are the flag's, else the pod's annotation (read once it is fetched)
        containers = [] if args.containers is None else parse_container_list(args.containers, "--containers")
        return Plan(None, containers, args.checkpoint_id)
    containers = parse_container_list(_targets(args.containers, pod, "--containers"), "--containers")
    targets = require_containers(pod, containers, "--containers")
    require_agreement(pod, checkpoint_id=args.checkpoint_id, containers=containers)
    require_placeholder(targets, args.placeholder_pattern)
    if (pod.get("metadata", {}).get("labels") or {}).get(names.LABEL_IS_CHECKPOINT_SOURCE) == "true":
        raise ManifestError(f"the manifest is labelled {names.LABEL_IS_CHECKPOINT_SOURCE}=true: a restore pod "
                            "must not be a checkpoint source")
    return Plan(pod, containers, args.checkpoint_id)


async def _run(args: argparse.Namespace, checked: Plan) -> Outcome:
    async with Client.from_config(args.kubeconfig, context=args.kube_context) as client:
        pod = checked.pod
        namespace = args.namespace or (pod or {}).get("metadata", {}).get("namespace") or client.namespace
        if args.command == "checkpoint":
            return await checkpoint(client, args, checked, namespace)
        if pod is not None:
            return await restore_new_pod(client, args, checked, namespace)
        return await restore_existing_pod(client, args, checked, namespace)


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ms|h|m|s)")


def _duration(text: str) -> float:
    """Seconds (`600`) or a Go duration as upstream's --timeout takes (`45m`, `1h30m`, `90s`)."""
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 600, 90s, 45m, 1h30m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)")
    common.add_argument("--kube-context", help="kubeconfig context (default: the current one)")
    common.add_argument("-n", "--namespace", help="namespace (default: the manifest's, else the kubeconfig's)")
    common.add_argument("-o", "--output", choices=("text", "json"), default="text")
    common.add_argument("--placeholder-pattern", default=DEFAULT_PLACEHOLDER_PATTERN,
                        help="regular expression that recognises placeholder images (default: %(default)s)")
    common.add_argument("--pvc", help="podMount storage: the namespace's checkpoint PVC (default: the agent's)")
    common.add_argument("--base-path", default="/checkpoints", help="podMount storage: where the PVC is mounted")
    parser = argparse.ArgumentParser(prog="snapshotctl", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ckpt = commands.add_parser("checkpoint", parents=[common], help="checkpoint a container of a pod manifest")
    ckpt.add_argument("-f", "--filename", "--manifest", dest="filename", required=True,
                      help="the Pod manifest (- for stdin)")
    ckpt.add_argument("--container", help="the container to checkpoint (default: the manifest's "
                      f"{names.ANN_TARGET_CONTAINERS} annotation)")
    ckpt.add_argument("--checkpoint-id", help="the ID to store it under (default: the manifest's label, else new)")
    ckpt.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                      help="wait, showing progress, until the checkpoint completes or fails (default, as upstream)")
    ckpt.add_argument("--timeout", type=_duration, default=DEFAULT_WAIT,
                      help="stop waiting after this: seconds or a duration such as 45m (default: 45m)")
    ckpt.add_argument("--shared-memory", default=DEFAULT_SHARED_MEMORY, help="/dev/shm size of the pod")
    ckpt.add_argument("--active-deadline-seconds", type=int, default=DEFAULT_DEADLINE)
    rst = commands.add_parser("restore", parents=[common], help="restore containers from a checkpoint")
    rst.add_argument("-f", "--filename", "--manifest", dest="filename",
                     help="create a new restore pod from this Pod manifest")
    rst.add_argument("--pod", help="or: patch restore metadata onto this existing snapshot-compatible pod")
    rst.add_argument("--checkpoint-id", required=True)
    rst.add_argument("--containers", help="comma-separated containers to restore (default: the manifest's, or "
                     f"with --pod the pod's, {names.ANN_TARGET_CONTAINERS} annotation)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(os.environ.get("DYN_SNAPSHOT_LOG_LEVEL", "warning"))  # stdout is for results only
    try:
        checked = plan(args)
        outcome = anyio.run(_run, args, checked)
    except (ManifestError, ConfigError) as err:  # ConfigError: the kubeconfig
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CLUSTER
    if args.output == "json":
        print(json.dumps(outcome.fields, sort_keys=True))
    else:
        print("\n".join(outcome.lines))
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
