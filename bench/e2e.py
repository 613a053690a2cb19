#!/usr/bin/env python3
"""End-to-end checkpoint and restore times on the local stack (control plane + kubelet + operator + agent,
all real; needs root, containerd and CRIU, like `make run`).

For each heap size and repetition: a DynamoCheckpoint of the counter worker (apply -> Ready), then a DGD
restoring one worker from it by checkpointRef (apply -> the restored worker running again). Reports, per
heap size, the medians of:

  checkpoint s      apply -> DynamoCheckpoint Ready (Job, pod start, warm-up, dump, confirmation)
  ready->criu s     the worker wrote ready-for-snapshot -> CRIU's dump started (kubelet probe included)
  agent ms          the agent saw the source pod Ready -> CRIU's dump started (the agent's own overhead)
  dump s            CRIU dump alone
  agent ckpt s      lease taken -> verdict on the Job and workload told (whole agent side)
  restore s         DGD applied -> restored worker running (ReplicaSet, pod start, placeholder, restore)
  agent restore s   the agent's restore (verify, PIDs, rootfs, CRIU, signal)

    sudo .venv/bin/python bench/e2e.py --heap-mib 64 512 --repeat 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dynamo_snapshot import logs
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.devcluster.stack import SnapshotStack, missing

COLUMNS = ("checkpoint s", "ready->criu s", "agent ms", "dump s", "agent ckpt s", "restore s", "agent restore s",
           "artifact MiB")


def one_round(flow: Flow, heap_mib: int, index: int) -> dict[str, float]:
    name = f"bench-{heap_mib}-{index}"
    run = flow.create_checkpoint(checkpoint_manifest(name, heap_mib=heap_mib, model=f"bench/{heap_mib}/{index}"))
    started = time.time()
    flow.stack.apply(dgd_manifest(name, replicas=1, heap_mib=heap_mib, checkpoint_ref=name))
    (restored,) = flow.wait_restored(component_selector(name), 1, started)
    if restored.instance != run.instance or not restored.heap_ok:
        raise RuntimeError(f"{restored.name} did not come back as the checkpointed worker: {restored}")
    flow.stack.kubectl("delete", "dgd", name, "-n", flow.stack.namespace, "--wait=true", timeout=120)
    flow.stack.kubectl("delete", "dckpt", name, "-n", flow.stack.namespace, "--wait=true", timeout=120)
    shutil.rmtree(flow.stack.checkpoints / run.checkpoint_id, ignore_errors=True)
    return {
        "checkpoint s": run.seconds,
        "ready->criu s": run.ready_to_criu,
        "agent ms": run.agent_overhead * 1000,
        "dump s": run.stages.get("dump", 0.0),
        "agent ckpt s": run.agent_total,
        "restore s": restored.seconds,
        "agent restore s": restored.agent_total,
        "artifact MiB": run.artifact_bytes / (1 << 20),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heap-mib", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where the stack keeps its state (default: a temporary directory)")
    args = parser.parse_args()
    reason = missing()
    if reason:
        print(f"cannot run the end-to-end benchmark here: {reason}", file=sys.stderr)
        return 1
    logs.configure("warning")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    results: dict[int, list[dict[str, float]]] = {}
    with SnapshotStack(root, namespace="bench").running() as stack:
        flow = Flow(stack)
        for heap in args.heap_mib:
            for index in range(args.repeat):
                row = one_round(flow, heap, index)
                results.setdefault(heap, []).append(row)
                print(f"heap {heap} MiB, round {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
    print(f"medians of {args.repeat} (one node, CPU worker, agentMount on local disk)\n")
    print("| heap MiB | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for heap, rows in results.items():
        values = [statistics.median(r[c] for r in rows) for c in COLUMNS]
        print(f"| {heap} | " + " | ".join(f"{v:.0f}" if c in ("agent ms", "artifact MiB") else f"{v:.2f}"
                                          for c, v in zip(COLUMNS, values, strict=True)) + " |")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
