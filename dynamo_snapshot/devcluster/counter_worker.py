"""A CPU stand-in for an inference worker, for the local node's end-to-end flow and the demo.

It runs in the placeholder image (Debian's python3; ``dynamo_snapshot.workload`` under
/opt/dynamo-snapshot) as the child of snapshot-init. It "warms up" by filling a heap of
COUNTER_HEAP_MB MiB, then counts, one tick every COUNTER_TICK_S seconds. Where checkpointing is
enabled (a checkpoint source pod) it says ready-for-snapshot after COUNTER_READY_AFTER ticks, and
exits 0 on snapshot-complete. A restored copy learns restore-complete and keeps counting from where
the checkpoint left it. Every event is one JSON line on stdout (the container log), carrying the
``instance`` drawn at the cold start: a restored worker reports the instance of the process that
was checkpointed, a cold one a new instance.
"""

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, "/opt/dynamo-snapshot")
from dynamo_snapshot import workload

HEAP_MB = int(os.environ.get("COUNTER_HEAP_MB", "64"))
TICK_S = float(os.environ.get("COUNTER_TICK_S", "0.05"))
READY_AFTER = int(os.environ.get("COUNTER_READY_AFTER", "20"))
REPORT_EVERY = int(os.environ.get("COUNTER_REPORT_EVERY", "100"))
LEGACY_MARKER = os.environ.get("COUNTER_LEGACY_MARKER") == "1"  # write guide-era upstream's ready-for-checkpoint


def report(event, **fields):
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def main():
    instance = os.urandom(6).hex()
    heap = bytearray(HEAP_MB << 20)
    for i in range(HEAP_MB):
        heap[i << 20 : (i << 20) + 32] = hashlib.sha256(f"{instance}-{i}".encode()).digest()
    digest = hashlib.sha256(heap).hexdigest()
    report("started", instance=instance, heap_mib=HEAP_MB, hostname=os.uname().nodename)

    count = 0
    ready = restored = False
    checkpointing = workload.enabled() and not workload.restore_standby()
    while True:
        count += 1
        if checkpointing and not ready and count >= READY_AFTER:
            if LEGACY_MARKER:  # as a guide-era upstream worker says it: an empty ready-for-checkpoint, by hand
                (workload.control_dir() / "ready-for-checkpoint").write_text("")
            else:  # its own script stands for the weights a real worker would read again after a restore
                workload.mark_ready_for_snapshot(reread_after_restore=[os.path.abspath(__file__)])
            ready = True
            report("ready-for-snapshot", instance=instance, count=count)
        if ready and not restored:
            if workload.signal_present(workload.RESTORE_COMPLETE):
                restored = True
                report("restored", instance=instance, count=count, hostname=os.uname().nodename,
                       heap_ok=hashlib.sha256(heap).hexdigest() == digest)
            elif workload.signal_present(workload.SNAPSHOT_COMPLETE):
                report("snapshot-complete", instance=instance, count=count)
                return 0
        if count % REPORT_EVERY == 0:
            report("tick", instance=instance, count=count)
        time.sleep(TICK_S)


if __name__ == "__main__":
    sys.exit(main())
