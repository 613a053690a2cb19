"""Counter workload for the node-machinery tests (runs in the test image with Debian's python3).

State a checkpoint must carry: a counter in memory, a heap of COUNTER_HEAP_MB MiB with a known
digest, a TCP listener answering with the counter and an established connection to it, a /dev/shm
segment holding the counter, an append-only log of every value in the container's root filesystem,
and a file deleted from the image. It says ready-for-snapshot after COUNTER_READY_AFTER ticks,
exits 0 on snapshot-complete and reports on stdout (the container log) what it found when
restore-complete appears.
"""

import hashlib
import json
import mmap
import os
import socket
import sys
import threading
import time

sys.path.insert(0, "/opt/dynamo-snapshot")
from dynamo_snapshot import workload

HEAP_MB = int(os.environ.get("COUNTER_HEAP_MB", "200"))
PORT = int(os.environ.get("COUNTER_PORT", "7777"))
DATA_DIR = os.environ.get("COUNTER_DATA_DIR", "/data")
TICK_S = float(os.environ.get("COUNTER_TICK_S", "0.02"))
READY_AFTER = int(os.environ.get("COUNTER_READY_AFTER", "25"))
HOLD_IO_URING = os.environ.get("COUNTER_HOLD_IO_URING") == "1"
REREAD = [p for p in os.environ.get("COUNTER_REREAD", "").split(":") if p]  # declared for a restore to prefetch
SHM_PATH = "/dev/shm/counter"
DOOMED = "/opt/workloads/doomed.txt"


def build_heap(mib):
    block = hashlib.sha256(b"dynamo-snapshot").digest() * (1 << 15)  # 1 MiB
    heap = bytearray(mib << 20)
    for i in range(mib):
        start = i << 20
        heap[start : start + (1 << 20)] = block
        heap[start : start + 8] = i.to_bytes(8, "little")  # every MiB differs
    return heap


def open_io_uring():
    """An io_uring instance: something CRIU cannot dump, to make a real dump fail."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 4, params)  # io_uring_setup(4 entries)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "io_uring_setup")
    return fd


def report(event, **fields):
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


class State:
    count = 0
    restored = False


HELD = []  # established connections the checkpoint must carry (CRIU --tcp-established)


def serve(listener):
    while True:
        conn, (address, _) = listener.accept()
        conn.sendall(json.dumps({"count": State.count, "restored": State.restored}).encode())
        if address == "127.0.0.1":
            HELD.append(conn)
        else:
            conn.close()


def main():
    heap = build_heap(HEAP_MB)
    heap_digest = hashlib.sha256(heap).hexdigest()

    os.makedirs(DATA_DIR, exist_ok=True)
    with open(os.path.join(DATA_DIR, "written-before-checkpoint.txt"), "w") as f:
        f.write("survives the restore\n")
    if os.path.exists(DOOMED):
        os.unlink(DOOMED)
    counter_log = open(os.path.join(DATA_DIR, "counter.log"), "a", buffering=1)

    shm_fd = os.open(SHM_PATH, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(shm_fd, 1 << 20)
    shm = mmap.mmap(shm_fd, 1 << 20)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", PORT))
    listener.listen(16)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    loopback = socket.create_connection(("127.0.0.1", PORT))
    loopback.recv(4096)
    ring = open_io_uring() if HOLD_IO_URING else None
    report("started", heap_mib=HEAP_MB, heap_digest=heap_digest, port=PORT, io_uring=ring)

    ready = False
    while True:
        # Read before writing: after a restore this shows whether /dev/shm kept what was written last.
        shm_kept = int.from_bytes(shm[0:8], "little") == State.count
        State.count += 1
        counter_log.write(f"{State.count}\n")
        shm[0:8] = State.count.to_bytes(8, "little")
        if not ready and State.count >= READY_AFTER and workload.enabled():
            workload.mark_ready_for_snapshot(reread_after_restore=REREAD)
            ready = True
            report("ready-for-snapshot", count=State.count)
        if ready and not State.restored:
            if workload.signal_present(workload.RESTORE_COMPLETE):
                State.restored = True
                report(
                    "restored",
                    count=State.count,
                    heap_ok=hashlib.sha256(heap).hexdigest() == heap_digest,
                    shm_ok=shm_kept,
                )
            elif workload.signal_present(workload.SNAPSHOT_COMPLETE):
                report("snapshot-complete", count=State.count)
                return 0
        time.sleep(TICK_S)


if __name__ == "__main__":
    sys.exit(main())
