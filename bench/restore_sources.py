"""Restore time by where the checkpoint comes from: the PVC path, S3 (MinIO on loopback), the node cache.

One process tree holding ``--gib`` GiB of memory is checkpointed once through the agent's pipeline
(``agent.tree``), into a PVC-like directory and uploaded to a MinIO bucket. Then it is restored, each
time with the page cache dropped and again warm:

    pvc     from the directory (CRIU reads the stored page files; the page data checked in memory)
    s3      from the bucket into an empty node cache (the ``fetch`` stage, chunks verified as they land;
            then as a cache hit)
    cache   from a node-cache entry (filled by a restore before; CRIU reads the agent's verified copy)

Prints one JSON line per restore and a table. Needs root, CRIU (hack/build-criu.sh) and MinIO
(hack/build-minio.sh):

    sudo .venv/bin/python bench/restore_sources.py --gib 2
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.artifact import authn
from dynamo_snapshot.agent.artifact import s3 as s3client
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.pipeline import restore as rst
from dynamo_snapshot.agent.pipeline.trees import TreeRestoreTarget
from dynamo_snapshot.devcluster import minio

HOLDER = """
import os, sys, time
heap = bytearray(os.urandom(64 << 20)) * int(sys.argv[1])
while True:
    time.sleep(0.05)
"""
ID = "bench-sources"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def gone(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.01)


def restore(work: Path, source: str, remote: ObjectStorage, cache: NodeCache, keyring: authn.Keyring,
            bundle: criu.CriuBundle, settings: criu.CriuSettings, threads: int) -> rst.RestoreResult:
    base, into = work / "pvc", cache if source == "cache" else None
    if source == "s3":  # a node that never had it: an empty node cache, fetched into
        base = work / "node"
        for empty in (base, work / "s3-cache"):
            shutil.rmtree(empty, ignore_errors=True)
        into = NodeCache(work / "s3-cache", cache.budget_bytes, io_threads=threads)
    request = rst.RestoreRequest(ID, base, io_threads=threads, prefetch_threads=0, keyring=keyring,
                                 remote=remote if source == "s3" else None, cache=into, private_root=work / "private")
    return anyio.run(lambda: rst.restore(TreeRestoreTarget(), request, bundle, settings=settings))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    if os.geteuid() != 0 or (reason := minio.missing()):
        print(f"needs root and MinIO ({'not root' if os.geteuid() else reason})", file=sys.stderr)
        return 2
    bundle, settings = criu.CriuBundle.locate(), criu.CriuSettings(network_lock="skip")
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored trees come back to us
    work = args.work or Path(tempfile.mkdtemp(prefix="restore-sources-", dir="/var/tmp"))
    authn.create_key(work / "keys", "k-bench")
    keyring = authn.Keyring.from_directory(work / "keys")
    rows = []
    with minio.running(work / "minio") as server:
        bucket = server.create_bucket("bench")
        client = s3client.S3Client(s3client.S3Settings(
            bucket=bucket, endpoint=server.endpoint, region=minio.REGION, path_style=True,
            access_key_id=server.user, secret_access_key=server.password))
        remote = ObjectStorage(client, prefix="bench")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.gib * 16)], start_new_session=True,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        time.sleep(2 + args.gib)  # the heap filled
        began = time.monotonic()
        stored = anyio.run(lambda: tree.checkpoint_tree(holder.pid, work / "pvc", ID, bundle, settings=settings,
                                                        keyring=keyring, remote=remote))
        print(json.dumps({"checkpoint_s": round(time.monotonic() - began, 2), "image_bytes": stored.image_bytes,
                          "seconds": {k: round(v, 3) for k, v in stored.seconds.items()}}), flush=True)
        gone(holder.pid)
        cache = NodeCache(work / "cache", 4 * stored.image_bytes, io_threads=args.threads)
        gone(restore(work, "pvc", remote, cache, keyring, bundle, settings, args.threads).host_pid)
        cache.fill_in_background(ID, "1", stored.directory, authn.open_manifest(stored.directory, keyring))
        cache.settle()
        entries = [(e.checkpoint_id, e.version) for e in cache.entries()]
        if entries != [(ID, "1")]:
            print(f"the node cache did not take the version: {entries}", file=sys.stderr)
            return 1
        for source in ("pvc", "s3", "cache"):
            for dropped in (True, False):
                if dropped:
                    drop_caches()
                began = time.monotonic()
                result = restore(work, source, remote, cache, keyring, bundle, settings, args.threads)
                if source == "cache" and result.background_seconds.get("prefetch-pages", 0) > 0:
                    print("the restore missed the node cache", file=sys.stderr)
                    return 1
                row = {"source": source, "page_cache": "dropped" if dropped else "warm",
                       "restore_s": round(time.monotonic() - began, 2),
                       "seconds": {k: round(v, 3) for k, v in result.seconds.items() if v >= 0.005}}
                gone(result.host_pid)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{stored.image_bytes / 1e9:.2f} GB image, {args.threads} threads, {os.cpu_count()} CPUs\n")
    print("| source | page cache | restore s | stages s |\n|---|---|---|---|")
    for row in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in row["seconds"].items())
        print(f"| {row['source']} | {row['page_cache']} | {row['restore_s']:.2f} | {stages} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
