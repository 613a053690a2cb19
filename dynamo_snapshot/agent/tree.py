"""Checkpoint and restore of a plain process tree on this host: no Kubernetes, no container runtime.

A thin front end of the agent's own checkpoint and restore pipelines (``pipeline/checkpoint.py``,
``pipeline/restore.py``) with the host-tree target (``pipeline/trees.py``): the GPU tests
(``tests/gpu``) and the GPU benchmark (``bench/gpu``) run the stages a GPU pod's checkpoint runs in
Kubernetes; only the target differs (no freezer, no rootfs, the host's namespaces).

The tree's root must lead its session (start it with ``setsid``), and a restore needs the original
gone: the restored tasks get their old PIDs back.

    python -m dynamo_snapshot.agent.tree checkpoint --pid 1234 --base /var/ckpt --id w1
    python -m dynamo_snapshot.agent.tree restore --base /var/ckpt --id w1 [--prefetch weights.safetensors]
                                                 [--gpu GPU-<uuid> ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from dynamo_snapshot.agent.artifact.authn import Keyring
from dynamo_snapshot.agent.artifact.nodecache import NodeCache
from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda.driverstep import DriverCuda
from dynamo_snapshot.agent.cuda.step import CudaStep, default_step
from dynamo_snapshot.agent.pipeline import checkpoint as ckpt
from dynamo_snapshot.agent.pipeline import restore as rst
from dynamo_snapshot.agent.pipeline.hooks import NO_HOOKS, Hooks
from dynamo_snapshot.agent.pipeline.trees import TreeRestoreTarget, TreeTarget

TreeCheckpoint = ckpt.CheckpointResult


@dataclass(frozen=True)
class TreeRestore:
    pid: int
    manifest: dict[str, Any]
    seconds: dict[str, float]  # per stage (``verify-memory``: the page data), and ``prefetch-pages`` beside them
    log_path: Path
    prefetch: Prefetch | None = None  # still reading in the background: .wait() for its result
    gpu_pairs: list[tuple[str, str]] = field(default_factory=list)


async def checkpoint_tree(
    root_pid: int,
    base: Path,
    checkpoint_id: str,
    bundle: criu.CriuBundle,
    cuda: CudaStep | None = None,
    settings: criu.CriuSettings | None = None,
    release: bool = True,
    io_threads: int | None = None,
    hooks: Hooks = NO_HOOKS,
    keyring: Keyring | None = None,
    remote: ObjectStorage | None = None,
    digest_during_dump: bool = True,
) -> ckpt.CheckpointResult:
    """The checkpoint pipeline on the tree rooted at ``root_pid`` (left running). ``digest_during_dump``:
    the page images are hashed while CRIU writes them (False: all files after the dump)."""
    request = ckpt.CheckpointRequest(checkpoint_id, base, io_threads=io_threads, release=release, keyring=keyring,
                                     remote=remote, digest_during_dump=digest_during_dump)
    return await ckpt.checkpoint(TreeTarget(root_pid), request, bundle, cuda, hooks, settings)


async def restore_tree(
    base: Path,
    checkpoint_id: str,
    bundle: criu.CriuBundle,
    cuda: CudaStep | None = None,
    settings: criu.CriuSettings | None = None,
    work_dir: Path | None = None,
    io_threads: int | None = None,
    prefetch: Sequence[Path] = (),
    prefetch_threads: int = 8,
    overlap: bool = True,
    hooks: Hooks = NO_HOOKS,
    keyring: Keyring | None = None,
    remote: ObjectStorage | None = None,
    cache: NodeCache | None = None,
) -> TreeRestore:
    """The restore pipeline onto this host. ``overlap``: CRIU starts once everything it parses is
    verified, the page data read ahead meanwhile and verified in the restored memory (tasks held
    stopped until it passed); without it, the page data is also verified on storage first.
    ``prefetch``: files read into the page cache after the image. ``cache``: a node cache to read a
    complete verified copy from (and to fill after a restore from storage)."""
    request = rst.RestoreRequest(checkpoint_id, base, work_dir=work_dir, io_threads=io_threads, keyring=keyring,
                                 prefetch_threads=prefetch_threads, prefetch=tuple(prefetch), overlap=overlap,
                                 remote=remote, cache=cache)
    done = await rst.restore(TreeRestoreTarget(), request, bundle, cuda, hooks, settings)
    seconds = {**done.seconds, **(done.background_seconds if overlap else {})}
    pairs = list(getattr(cuda, "gpu_pairs", []))
    return TreeRestore(done.host_pid, done.manifest, seconds, done.log_path, done.prefetch, pairs)


def _settings(args: argparse.Namespace) -> criu.CriuSettings:
    return criu.CriuSettings(network_lock=args.network_lock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamo_snapshot.agent.tree", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint", help="checkpoint the tree rooted at --pid")
    ck.add_argument("--pid", type=int, required=True)
    ck.add_argument("--no-release", action="store_true", help="leave the source CUDA-checkpointed")
    rs = sub.add_parser("restore", help="restore a tree checkpoint")
    rs.add_argument("--prefetch", type=Path, nargs="*", default=[])
    rs.add_argument("--io-threads", type=int)
    rs.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="UUID",
        help="restore onto this GPU (repeat for several; default: the GPUs it was checkpointed on)",
    )
    for p in (ck, rs):
        p.add_argument("--base", type=Path, required=True)
        p.add_argument("--id", required=True)
        p.add_argument("--network-lock", default="nftables", help="nftables, iptables or skip")
        p.add_argument("--lock-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    bundle = criu.CriuBundle.locate()
    step = default_step(args.lock_timeout)
    if getattr(args, "gpu", None):
        if not isinstance(step, DriverCuda):
            parser.error("--gpu: this node has no NVIDIA driver")
        step.restore_onto = tuple(args.gpu)

    async def run() -> dict[str, Any]:
        if args.command == "checkpoint":
            done = await checkpoint_tree(
                args.pid, args.base, args.id, bundle, step, _settings(args), release=not args.no_release
            )
            return {"directory": str(done.directory), "imageBytes": done.image_bytes, "seconds": done.seconds}
        back = await restore_tree(
            args.base, args.id, bundle, step, _settings(args), io_threads=args.io_threads, prefetch=args.prefetch
        )
        return {"pid": back.pid, "seconds": back.seconds, "gpuPairs": back.gpu_pairs}

    print(json.dumps(anyio.run(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
