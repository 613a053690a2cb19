"""Keeping the checkpoint's PIDs free in the placeholder's PID namespace.

CRIU gives every restored task (threads included) the PID it had at checkpoint time, with clone3's
set_tid; it fails if one is taken. The placeholder's namespace also holds snapshot-init (PID 1), exec
probes and the restore tooling itself. Two things keep them apart:

* snapshot-init starts the checkpointed workload at PID 1000 or above (see
  ``dynamo_snapshot.workload.init``), so processes a restore pod starts before the restore, which
  count up from 2, stay below the checkpoint's PIDs;
* right before the restore, the agent (privileged; nothing in the pod needs privilege) raises the
  namespace's ``ns_last_pid`` to the highest checkpoint PID, so everything started from then on,
  the restore tooling included, gets a PID above them, and waits until processes that already held
  one of them (a probe that was running) are gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import anyio
import structlog

from dynamo_snapshot.agent.errors import RestoreError
from dynamo_snapshot.agent.host import procfs

log = structlog.get_logger(__name__)

# ns_last_pid is per PID namespace: the writer must be *in* the namespace, hence nsenter --pid,
# which forks the shell into it. The shell only raises the counter, never lowers it.
# (cat, not read: sysctl files answer only reads from offset 0, and read(1) goes byte by byte.)
_RAISE_COUNTER = (
    "last=$(cat /proc/sys/kernel/ns_last_pid) && "
    'if [ "$last" -lt "$1" ]; then echo "$1" > /proc/sys/kernel/ns_last_pid; fi'
)
_POLL_S = 0.02


async def raise_pid_counter(init_pid: int, at_least: int) -> None:
    """Make the next PID allocated in ``init_pid``'s namespace greater than ``at_least``."""
    result = await anyio.run_process(
        ["nsenter", "--target", str(init_pid), "--pid", "--", "/bin/sh", "-c", _RAISE_COUNTER, "sh", str(at_least)],
        check=False,
    )
    if result.returncode != 0:
        raise RestoreError(
            f"cannot raise ns_last_pid in the PID namespace of process {init_pid}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )


def _holders(pidns_inode: int, needed: set[int]) -> dict[int, int]:
    return {vpid: tid for vpid, tid in procfs.tasks_in_pid_namespace(pidns_inode).items() if vpid in needed}


async def wait_until_free(init_pid: int, needed: Iterable[int], timeout_s: float = 30.0) -> None:
    """Wait until no task in ``init_pid``'s PID namespace holds one of ``needed``."""
    needed = set(needed)
    pidns = procfs.namespace_inode(init_pid, "pid")
    deadline = time.monotonic() + timeout_s
    while holders := _holders(pidns, needed):
        if time.monotonic() > deadline:
            described = ", ".join(f"{vpid} ({procfs.comm(tid)})" for vpid, tid in sorted(holders.items()))
            raise RestoreError(
                f"PIDs needed by the checkpoint are still taken in the placeholder of process {init_pid} "
                f"after {timeout_s} s: {described}"
            )
        log.debug("waiting for checkpoint PIDs to be released", holders=sorted(holders))
        await anyio.sleep(_POLL_S)  # exits of unrelated processes have no notification we can wait on


async def reserve(init_pid: int, needed: Iterable[int], timeout_s: float = 30.0) -> None:
    needed = sorted(set(needed))
    if not needed:
        return
    if 1 in needed:
        raise RestoreError("the checkpoint contains PID 1; only a workload below snapshot-init can be restored")
    await raise_pid_counter(init_pid, needed[-1])
    await wait_until_free(init_pid, needed, timeout_s)
