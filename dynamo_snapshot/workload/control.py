"""Files in the control directory that the agent and the worker use to talk (SPEC section 8).

* ``ready-for-snapshot``: worker -> agent. Warmed up and quiescent; checkpoint me now. Its content is
  JSON: ``{"readyAt": <unix time>, "rereadAfterRestore": [<absolute paths>]}`` (the list is optional;
  content that is not a JSON object declares nothing).
* ``snapshot-complete``: agent -> worker. The checkpoint is stored and verified; exit 0.
* ``restore-complete``: agent -> restored worker. You were restored into a new pod and are live.

Every write is atomic (temporary file + rename), so a reader never sees a half-written signal.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from dynamo_snapshot.workload import helpers

CONTROL_DIR_ENV = "DYN_SNAPSHOT_CONTROL_DIR"
RESTORE_STANDBY_ENV = "DYN_SNAPSHOT_RESTORE_STANDBY"
# "cold": a restore pod whose restore the agent refused for good starts its workload cold (Immediate)
RESTORE_FALLBACK_ENV = "DYN_SNAPSHOT_RESTORE_FALLBACK"
RESTORE_FALLBACK_COLD = "cold"

READY_FOR_SNAPSHOT = "ready-for-snapshot"
SNAPSHOT_COMPLETE = "snapshot-complete"
RESTORE_COMPLETE = "restore-complete"
RESTORE_FAILED = "restore-failed"  # the agent refused this pod's restore for good: {"reason": ...}

MAX_REREAD_PATHS = 1024  # what ready-for-snapshot may name for the agent to prefetch on a restore


class Outcome(enum.Enum):
    SNAPSHOT_COMPLETE = SNAPSHOT_COMPLETE
    RESTORE_COMPLETE = RESTORE_COMPLETE


def control_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The control directory, or None when checkpoint/restore is not enabled for this process."""
    value = environ.get(CONTROL_DIR_ENV, "").strip()
    return Path(value) if value else None


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return control_dir(environ) is not None


def restore_fallback_cold(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a refused restore makes this restore pod start its workload cold."""
    return environ.get(RESTORE_FALLBACK_ENV, "").strip().lower() == RESTORE_FALLBACK_COLD


def restore_standby(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a restore pod: the container waits for the agent to restore the worker into it."""
    return environ.get(RESTORE_STANDBY_ENV, "").strip().lower() in ("1", "true", "yes")


def _require_dir(directory: Path | None) -> Path:
    resolved = directory or control_dir()
    if resolved is None:
        raise RuntimeError(f"{CONTROL_DIR_ENV} is not set: this pod is not set up for checkpoint/restore")
    return resolved


def write_signal(name: str, content: str = "", directory: Path | None = None) -> Path:
    """Atomically create ``name`` in the control directory with ``content``."""
    target = _require_dir(directory) / name
    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def signal_present(name: str, directory: Path | None = None) -> bool:
    return (_require_dir(directory) / name).exists()


def read_signal(name: str, directory: Path | None = None) -> str | None:
    try:
        return (_require_dir(directory) / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def mark_ready_for_snapshot(
    directory: Path | None = None, stop_helpers: bool = True, reread_after_restore: Iterable[str | os.PathLike] = ()
) -> Path:
    """Tell the agent this worker is warmed up and quiescent: first the registered ``on_snapshot``
    hooks run, then helper processes that would block a CUDA checkpoint are shut down
    (``helpers.stop_gpu_helpers``, e.g. torch.compile's compile workers) and freed heap memory is
    returned to the kernel (a smaller image).

    ``reread_after_restore`` names files (or directories of them) this worker reads again as soon as
    it is restored, typically its weights after an ``on_snapshot`` hook released them: the agent
    records them with the checkpoint and, on a restore, reads them into the node's page cache while
    CRIU and the CUDA restore run, so the ``on_restore`` reload finds them there. Absolute paths, as
    the worker sees them."""
    target = _require_dir(directory)
    declared = [os.fspath(p) for p in reread_after_restore]
    if problems := [p for p in declared if not isinstance(p, str) or not p.startswith("/") or "\0" in p]:
        raise ValueError(
            f"reread_after_restore: {problems[0]!r} is not an absolute path; name files as this "
            "worker opens them, e.g. /models/llama/model-00001.safetensors"
        )
    if len(declared) > MAX_REREAD_PATHS:
        raise ValueError(
            f"reread_after_restore: {len(declared)} paths, at most {MAX_REREAD_PATHS}; "
            "name the directory that holds them instead"
        )
    helpers.run_snapshot_hooks()
    if stop_helpers:
        helpers.stop_gpu_helpers()
    helpers.trim_host_memory()
    content: dict[str, object] = {"readyAt": round(time.time(), 3)}
    if declared:
        content["rereadAfterRestore"] = declared
    return write_signal(READY_FOR_SNAPSHOT, json.dumps(content) + "\n", target)


def wait_for_outcome(
    timeout: float | None = None, poll_interval: float = 0.05, directory: Path | None = None
) -> Outcome:
    """Block until the agent reports the checkpoint stored (this copy should exit 0) or this process
    was restored into a new pod. The control directory has no change notification in the stdlib, so
    this polls; ``poll_interval`` bounds the added latency.

    Raises TimeoutError when ``timeout`` seconds pass without an outcome.
    """
    directory = _require_dir(directory)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # A restored process sees the new pod's (empty) control directory, so the order of these
        # checks only matters if both files exist, which the agent never does.
        if (directory / RESTORE_COMPLETE).exists():
            helpers.run_restore_hooks()
            return Outcome.RESTORE_COMPLETE
        if (directory / SNAPSHOT_COMPLETE).exists():
            return Outcome.SNAPSHOT_COMPLETE
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no checkpoint outcome in {directory} after {timeout} s")
        time.sleep(poll_interval)
