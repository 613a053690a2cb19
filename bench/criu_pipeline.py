#!/usr/bin/env python3
"""Measures the node pipelines on real containerd + runc + CRIU: dump and restore time and artifact
size per GiB of workload heap.

    sudo .venv/bin/python bench/criu_pipeline.py [--heap-mib 256 1024] [--repeat 1] [--drop-caches]

Each run starts the counter workload (tests/agent/workloads/counter.py) with the given heap in a
CRI-created container, checkpoints it with the agent's pipeline, restores it into a placeholder in a
new sandbox, and prints one row; "restore s" is the wall time of the whole restore (the page data is
verified in the background, overlapping the other stages). Needs what ``hack/ci/containers.sh``
installs, and root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from dynamo_snapshot.agent.container import criu  # noqa: E402
from tests.agent import node_harness as harness  # noqa: E402

GIB = 1 << 30


def one_run(
    node: harness.Node,
    pods: harness.Pods,
    bundle: criu.CriuBundle,
    heap_mib: int,
    run: int,
    base: Path,
    drop_caches: bool,
) -> dict[str, float]:
    checkpoint_id = f"bench-{heap_mib}-{run}"
    source = pods.counter(heap_mib=heap_mib)
    stored = harness.checkpoint(node, bundle, source, base, checkpoint_id)
    size = sum(f["size"] for f in stored.manifest["files"])
    pages = sum(f["size"] for f in stored.manifest["files"] if f["path"].startswith("pages-"))
    placeholder = pods.placeholder()
    if drop_caches:  # a restore on another node reads the image from storage, not from memory
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    started = time.monotonic()
    restored = harness.restore(node, bundle, placeholder, base, checkpoint_id)
    wall = time.monotonic() - started
    harness.wait_for(
        lambda: any(e["event"] == "restored" and e["heap_ok"] for e in placeholder.events()),
        120,
        "the restored workload to verify its heap",
    )
    node.remove_pod(source.pod)
    node.remove_pod(placeholder.pod)
    return {
        "dump": stored.seconds["dump"],
        "checkpoint": sum(stored.seconds.values()),
        "criu_restore": restored.seconds["criu"],
        "restore": wall,
        "size": size,
        "pages": pages,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heap-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each restore")
    args = parser.parse_args()
    reason = harness.missing()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    bundle = criu.CriuBundle.locate()
    rows = []
    with tempfile.TemporaryDirectory(prefix="criu-bench-") as tmp, harness.running_node(Path(tmp) / "node") as node:
        pods = harness.Pods(node, Path(tmp) / "pods")
        for heap_mib in args.heap_mib:
            runs = [
                one_run(node, pods, bundle, heap_mib, i, Path(tmp) / "checkpoints", args.drop_caches)
                for i in range(args.repeat)
            ]
            median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            rows.append((heap_mib, median))

    print(f"CRIU {bundle.version()}, {args.repeat} run(s) per heap size, medians")
    header = (
        "heap MiB",
        "criu dump s",
        "checkpoint s",
        "criu restore s",
        "restore s",
        "artifact MiB",
        "MiB per GiB heap",
        "dump s/GiB",
        "restore s/GiB",
    )
    print(" | ".join(header))
    print(" | ".join("-" * len(h) for h in header))
    for heap_mib, m in rows:
        gib = heap_mib / 1024
        print(
            " | ".join(
                [
                    f"{heap_mib}",
                    f"{m['dump']:.2f}",
                    f"{m['checkpoint']:.2f}",
                    f"{m['criu_restore']:.2f}",
                    f"{m['restore']:.2f}",
                    f"{m['size'] / (1 << 20):.0f}",
                    f"{m['size'] / (1 << 20) / gib:.0f}",
                    f"{m['dump'] / gib:.2f}",
                    f"{m['criu_restore'] / gib:.2f}",
                ]
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
