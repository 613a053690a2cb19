"""The worker side of checkpoint/restore: the ``/snapshot-control`` contract (stdlib only).

Inference workers import this; keep it free of third-party and heavy imports.

    from dynamo_snapshot import workload

    warm_up()
    if workload.enabled():
        workload.mark_ready_for_snapshot()
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

__all__ = [
    "CONTROL_DIR_ENV",
    "READY_FOR_SNAPSHOT",
    "RESTORE_COMPLETE",
    "RESTORE_STANDBY_ENV",
    "SNAPSHOT_COMPLETE",
    "Outcome",
    "control_dir",
    "enabled",
    "mark_ready_for_snapshot",
    "read_signal",
    "restore_standby",
    "signal_present",
    "wait_for_outcome",
    "write_signal",
]
