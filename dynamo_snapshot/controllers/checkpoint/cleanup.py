"""The cleanup Job that removes a deleted automatic checkpoint's artifacts from a PVC (object storage:
``finalize.ObjectCleanup``)."""

from __future__ import annotations

import posixpath
import re
from typing import Any

from dynamo_snapshot.api import DynamoCheckpoint, names
from dynamo_snapshot.controllers.checkpoint.job import owner_reference
from dynamo_snapshot.controllers.storage import Storage, StorageUnavailable

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
STORAGE_VOLUME = "checkpoint-storage"
# Held by every automatic checkpoint until its artifacts are removed from storage (a cleanup Job on a
# PVC; an agent with object storage).
CLEANUP_FINALIZER = names.FINALIZER_CHECKPOINT_CLEANUP


class UnsafeCleanupPath(ValueError):
    pass


def cleanup_job_name(checkpoint_id: str) -> str:
    return f"checkpoint-cleanup-{checkpoint_id}"


def cleanup_target(base_path: str, checkpoint_id: str) -> str:
    """`<basePath>/<id>`, refusing anything that could name a path outside basePath."""
    if not _SAFE_ID.match(checkpoint_id or ""):
        raise UnsafeCleanupPath(f"refusing to clean up checkpoint ID {checkpoint_id!r}: not a plain ID")
    base = posixpath.normpath(base_path)
    if not base.startswith("/") or base == "/":
        raise UnsafeCleanupPath(
            f"refusing to clean up under base path {base_path!r}: must be an absolute, non-root path")
    target = posixpath.normpath(posixpath.join(base, checkpoint_id))
    if posixpath.dirname(target) != base:
        raise UnsafeCleanupPath(f"refusing to clean up {target!r}: outside {base}")
    return target


def build_cleanup_job(ckpt: DynamoCheckpoint, checkpoint_id: str, storage: Storage, image: str) -> dict[str, Any]:
    if not storage.pvc_name:  # object storage: the agents remove it (finalize.ObjectCleanup), no Job
        raise StorageUnavailable(f"{storage.location(checkpoint_id)} is on no PVC: a cleanup Job cannot remove it")
    target = cleanup_target(storage.base_path, checkpoint_id)
    base = posixpath.normpath(storage.base_path)
    # The script checks again where the path resolves, so a symlink planted in storage cannot widen it.
    script = (
        'set -eu; t="$1"; b="$2"; [ -e "$t" ] || [ -L "$t" ] || exit 0; '
        'case "$(dirname "$t")" in "$b") ;; *) echo "refusing $t: outside $b" >&2; exit 2;; esac; '
        'rm -rf -- "$t"'
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": cleanup_job_name(checkpoint_id),
            "namespace": ckpt.metadata.namespace,
            "labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id},
            "ownerReferences": [owner_reference(ckpt)],
        },
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": 300,
            "template": {
                "metadata": {"labels": {names.LABEL_CHECKPOINT_ID: checkpoint_id}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "cleanup",
                        "image": image,
                        "command": ["sh", "-c", script, "cleanup", target, base],
                        "volumeMounts": [{"name": STORAGE_VOLUME, "mountPath": base}],
                    }],
                    "volumes": [{"name": STORAGE_VOLUME,
                                 "persistentVolumeClaim": {"claimName": storage.pvc_name}}],
                },
            },
        },
    }
