"""The worker side of checkpoint/restore: the ``/snapshot-control`` contract (stdlib only).

Inference workers import this; keep it free of third-party and heavy imports.

    from dynamo_snapshot import workload

    warm_up()
    if workload.enabled():
        workload.mark_ready_for_snapshot()   # runs on_snapshot hooks, stops GPU helper processes
        if workload.wait_for_outcome() is workload.Outcome.SNAPSHOT_COMPLETE:
            sys.exit(0)          # the checkpoint is safe; this copy is done
        reconnect()              # restored into a new pod: refresh peers, addresses, leases
    serve()
"""

from dynamo_snapshot.workload.control import (
    CONTROL_DIR_ENV,
    READY_FOR_SNAPSHOT,
    RESTORE_COMPLETE,
    RESTORE_STANDBY_ENV,
    SNAPSHOT_COMPLETE,
    Outcome,
    control_dir,
    enabled,
    mark_ready_for_snapshot,
    read_signal,
    restore_standby,
    signal_present,
    wait_for_outcome,
    write_signal,
)
from dynamo_snapshot.workload.helpers import (
    KNOWN_HELPERS,
    gpu_descendants,
    on_restore,
    on_snapshot,
    stop_gpu_helpers,
    trim_host_memory,
)

__all__ = [
    "CONTROL_DIR_ENV",
    "KNOWN_HELPERS",
    "READY_FOR_SNAPSHOT",
    "RESTORE_COMPLETE",
    "RESTORE_STANDBY_ENV",
    "SNAPSHOT_COMPLETE",
    "Outcome",
    "control_dir",
    "enabled",
    "gpu_descendants",
    "mark_ready_for_snapshot",
    "on_restore",
    "on_snapshot",
    "read_signal",
    "restore_standby",
    "signal_present",
    "stop_gpu_helpers",
    "trim_host_memory",
    "wait_for_outcome",
    "write_signal",
]
