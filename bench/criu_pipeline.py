#!/usr/bin/env python3
"""Measures the node pipelines on real containerd + runc + CRIU: dump and restore time and artifact
size per GiB of workload heap; with ``--tree-gib``, the checkpoint pipeline's stages on a host process
tree instead (no containers), the page images digested after the dump against during it.

    sudo .venv/bin/python bench/criu_pipeline.py [--heap-mib 256 1024] [--repeat 1] [--drop-caches]
    sudo .venv/bin/python bench/criu_pipeline.py --tree-gib 3 [--repeat 3]

Each run starts the counter workload (tests/agent/workloads/counter.py) with the given heap in a
CRI-created container, checkpoints it with the agent's pipeline, restores it into a placeholder in a
new sandbox, and prints one row; "restore s" is the wall time of the whole restore (the page data is
verified in the background, overlapping the other stages). Needs what ``hack/ci/containers.sh``
installs, and root.

Tree mode: (1) start a tree of two processes holding --tree-gib GiB of random private memory between
them (agent/tree.py's target: its root leads its session), (2) checkpoint it with ``checkpoint_tree``
--repeat times each way, the ways taking turns, ``os.sync()`` and the previous artifact removed before
each, (3) print the median of each stage (CUDA and release are no-ops without a GPU) and of the whole.
Needs root and the CRIU bundle (hack/build-criu.sh).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from dynamo_snapshot.agent.container import criu  # noqa: E402
from tests.agent import node_harness as harness  # noqa: E402

GIB = 1 << 30

# A root holding half the GiB and one child holding the other half, each random; says so, then waits.
TREE = """
import mmap, os, sys, time
half = int(float(sys.argv[1]) * (1 << 30)) // 2
def hold():
    m = mmap.mmap(-1, half, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, half, 64 << 20):
        m[off:off + (64 << 20)] = os.urandom(min(64 << 20, half - off))
    return m
child = os.fork()
kept = hold()
if not child:
    open(sys.argv[2] + ".child", "w").close()
else:
    while not os.path.exists(sys.argv[2] + ".child"):
        time.sleep(0.05)
    open(sys.argv[2], "w").close()
while True:
    time.sleep(1)
"""


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


def start_tree(gib: float, work: Path) -> subprocess.Popen:
    ready = work / "tree.ready"
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(gib), str(ready)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the memory tree exited with {proc.returncode}")
        time.sleep(0.05)
    return proc


def tree_bench(gib: float, repeat: int) -> int:
    from dynamo_snapshot.agent import tree
    from dynamo_snapshot.agent.artifact import authn

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    bundle = criu.CriuBundle.locate()
    settings = criu.CriuSettings(network_lock="skip")
    ways = {"digests after the dump": False, "digests during the dump": True}
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="criu-tree-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        authn.create_key(work / "keys", "bench")
        keyring = authn.Keyring.from_directory(work / "keys")
        proc = start_tree(gib, work)
        try:
            for r in range(repeat):
                for way, during in ways.items():
                    shutil.rmtree(work / "ck", ignore_errors=True)
                    os.sync()
                    started = time.monotonic()
                    done = anyio.run(functools.partial(
                        tree.checkpoint_tree, proc.pid, work / "ck", f"t{r}", bundle, settings=settings,
                        keyring=keyring, digest_during_dump=during))
                    row = {**done.seconds, "total": time.monotonic() - started, "image": done.image_bytes / GIB,
                           "early": float(len(done.digested_during_dump))}
                    runs[way].append(row)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stages = ["resolve", "cuda", "dump", "manifest", "promote", "release", "total"]
    print(f"CRIU {bundle.version()}, a 2-process tree with {gib:g} GiB of random memory, "
          f"{os.cpu_count()} CPUs, median of {repeat}")
    print(" | ".join(["way", "image GiB", *[f"{s} s" for s in stages], "files digested during dump"]))
    print(" | ".join(["---"] * (len(stages) + 3)))
    for way, rows in runs.items():
        med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in [*stages, "image", "early"]}
        print(" | ".join([way, f"{med['image']:.2f}", *[f"{med[s]:.2f}" for s in stages], f"{med['early']:.0f}"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heap-mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each restore")
    parser.add_argument("--tree-gib", type=float, help="tree mode: checkpoint a host process tree of this many GiB")
    args = parser.parse_args()
    if args.tree_gib:
        return tree_bench(args.tree_gib, args.repeat)
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
