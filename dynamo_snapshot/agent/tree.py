"""Checkpoint and restore of a plain process tree on this host: no Kubernetes, no container runtime.

The same CUDA step, CRIU bundle and verified artifact as the container pipelines, for development,
the GPU tests (``tests/gpu``) and the GPU benchmark (``bench/gpu``):

    checkpoint  resolve (the tree, its threads) -> cuda (lock + checkpoint) -> dump (CRIU, the tree in
                the host's namespaces, left running) -> manifest -> promote -> release (the source
                gets its GPU state back and runs on)
    restore     verify (listing and every byte CRIU parses, in parallel) -> check (PIDs free, GPUs)
                -> criu (restore detached, same PIDs, tasks held stopped while the raw page data is
                still being verified ahead of CRIU's reads) -> cuda (restore, remap GPUs, unlock);
                files named for prefetch are read into the page cache once the image is read

The tree's root must lead its session (start it with ``setsid``), and a restore needs the original
gone: the restored tasks get their old PIDs back.

    python -m dynamo_snapshot.agent.tree checkpoint --pid 1234 --base /var/ckpt --id w1
    python -m dynamo_snapshot.agent.tree restore --base /var/ckpt --id w1 [--prefetch weights.safetensors]
                                                 [--gpu GPU-<uuid> ...]
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot import lifecycle
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact.pagecheck import PageCheck
from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda import devices as cuda_devices
from dynamo_snapshot.agent.cuda.step import CudaState, CudaStep, DriverCuda, NoCuda, default_step
from dynamo_snapshot.agent.errors import CheckpointError, CriuFailed, RestoreError
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.pipeline.stages import Stages

log = structlog.get_logger(__name__)


class CheckpointStage(enum.StrEnum):
    RESOLVE = "resolve"
    CUDA = "cuda"
    DUMP = "dump"
    MANIFEST = "manifest"
    PROMOTE = "promote"
    RELEASE = "release"


class RestoreStage(enum.StrEnum):
    VERIFY = "verify"
    CHECK = "check"
    CRIU = "criu"
    CUDA = "cuda"


@dataclass(frozen=True)
class TreeCheckpoint:
    directory: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]

    @property
    def image_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"])


@dataclass(frozen=True)
class TreeRestore:
    pid: int
    manifest: dict[str, Any]
    seconds: dict[str, float]
    log_path: Path
    prefetch: Prefetch | None = None  # still reading in the background: .wait() for its result
    gpu_pairs: list[tuple[str, str]] = field(default_factory=list)


def _plugins_dir(bundle: criu.CriuBundle) -> str | None:
    plugins = bundle.path / "plugins"
    return str(plugins) if plugins.is_dir() else None


def _tree_tasks(root: int) -> list[int]:
    """Every thread of every process of the tree (host TIDs; in the host's namespace these are the PIDs)."""
    return sorted({tid for pid in procfs.process_tree(root) for tid in procfs.threads(pid)})


async def checkpoint_tree(
    root_pid: int,
    base: Path,
    checkpoint_id: str,
    bundle: criu.CriuBundle,
    cuda: CudaStep | None = None,
    settings: criu.CriuSettings | None = None,
    release: bool = True,
    io_threads: int | None = None,
    observer: Callable[[CheckpointStage], Awaitable[None]] | None = None,
) -> TreeCheckpoint:
    cuda = cuda or NoCuda()
    settings = settings or criu.CriuSettings()
    bound = log.bind(root_pid=root_pid, checkpoint_id=checkpoint_id)
    stages = Stages[CheckpointStage]("tree checkpoint", bound, observer)

    await stages.enter(CheckpointStage.RESOLVE)
    if os.getsid(root_pid) != root_pid:
        raise CheckpointError(
            f"{cuda_devices.describe_process(root_pid)} does not lead its session; CRIU dumps a tree whose "
            "root does (start it with setsid)"
        )
    tasks = _tree_tasks(root_pid)
    layout = artifact.ArtifactLayout(base, checkpoint_id)
    criu_version = await anyio.to_thread.run_sync(bundle.version)
    staging = layout.new_staging()
    stdio = []
    for fd in (0, 1, 2):
        try:
            stdio.append(procfs.fd_target(root_pid, fd))
        except FileNotFoundError:
            stdio.append("")
    stages.leave(CheckpointStage.RESOLVE)

    try:
        await stages.enter(CheckpointStage.CUDA)
        await cuda.prepare(tasks)
        cuda_state = await cuda.checkpoint()
        stages.leave(CheckpointStage.CUDA)

        await stages.enter(CheckpointStage.DUMP)
        options = criu.DumpOptions.configured(
            settings,
            pid=root_pid,
            images_dir=staging,
            freeze_cgroup=None,
            net_ns_inode=None,
            pid_ns_inode=None,
            external_mounts={},
            libdir=_plugins_dir(bundle),
        )
        await criu.run("dump", [*bundle.command(), *options.argv()], staging / options.log_file)
        stages.leave(CheckpointStage.DUMP)

        await stages.enter(CheckpointStage.MANIFEST)
        compatibility = artifact.Compatibility.of_this_node(
            criu_version, cuda_state.driver_version, cuda_state.gpus, cuda_state.gpu_models
        )
        fields = {
            "checkpointID": checkpoint_id,
            "artifactVersion": layout.artifact_version,
            "createdAt": artifact.now_rfc3339(),
            "compatibility": compatibility.to_json(),
            "workload": {"rootPID": root_pid, "pids": tasks, "stdio": stdio, "processTree": True},
            "criu": {"externalMounts": {}, "dumpArgv": options.argv(), "networkLock": settings.network_lock},
            "cuda": cuda_state.manifest_block(),
        }
        manifest = await anyio.to_thread.run_sync(artifact.write_manifest, staging, fields, io_threads)
        stages.leave(CheckpointStage.MANIFEST)

        await stages.enter(CheckpointStage.PROMOTE)
        final = await anyio.to_thread.run_sync(layout.promote, staging)
        stages.leave(CheckpointStage.PROMOTE)
    except BaseException as exc:
        bound.error("tree checkpoint failed", error=str(exc))
        with anyio.CancelScope(shield=True):
            await cuda.abort()  # CRIU resumed the tree on its way out; bring its GPU state back
            kept = layout.failed_log(staging)
            artifact.discard_staging(staging, kept)
        if isinstance(exc, CriuFailed) and kept.exists():
            exc.log_path = str(kept)
        raise

    await stages.enter(CheckpointStage.RELEASE)
    if release:
        await cuda.release()
    stages.leave(CheckpointStage.RELEASE)
    bound.info(
        "tree checkpoint stored", directory=str(final), seconds={k: round(v, 3) for k, v in stages.seconds.items()}
    )
    return TreeCheckpoint(final, manifest, dict(stages.seconds))


def _kill_tree(pid: int) -> None:
    for member in reversed(procfs.process_tree(pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def _check_pids_free(pids: Sequence[int]) -> None:
    busy = [pid for pid in pids if procfs.proc(pid).exists()]
    if busy:
        who = "; ".join(cuda_devices.describe_process(p) for p in busy[:3])
        raise RestoreError(
            f"{len(busy)} of the checkpoint's PIDs are in use ({who}); a process tree restores with its own "
            "PIDs, so the original must be gone"
        )


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
    observer: Callable[[RestoreStage], Awaitable[None]] | None = None,
) -> TreeRestore:
    """Restore a tree checkpoint.

    ``overlap``: CRIU starts once everything it parses is verified (all files but the raw page
    data), while the page data is still being verified by ``io_threads`` readers ahead of it; the
    restored tasks stay stopped (``--leave-stopped``) until every byte has passed, and are killed
    if one does not. Without it, everything is verified first.

    ``prefetch`` names files the restored process reads at once (its weights): they are read into
    the page cache after the image's page data (which the restore needs first), while CRIU and the
    CUDA restore run."""
    cuda = cuda or NoCuda()
    settings = settings or criu.CriuSettings()
    layout = artifact.ArtifactLayout(base, checkpoint_id)
    images = layout.final_dir
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # CRIU refuses an existing pidfile
    work_dir = work_dir or base / checkpoint_id / artifact.RESTORES / attempt
    bound = log.bind(checkpoint_id=checkpoint_id)
    stages = Stages[RestoreStage]("tree restore", bound, observer)
    warm: Prefetch | None = None
    restored: int | None = None
    pidfile = work_dir / "restored.pid"

    try:
        await stages.enter(RestoreStage.VERIFY)
        node = await cuda.node_state()
        here = artifact.Compatibility.of_this_node(
            await anyio.to_thread.run_sync(bundle.version), node.driver_version, node.gpus, node.gpu_models
        )
        manifest = await anyio.to_thread.run_sync(artifact.verify_listing, images, checkpoint_id, here)
        early = artifact.is_parsed if overlap else (lambda rel: True)
        await anyio.to_thread.run_sync(lambda: artifact.verify_digests(images, manifest, early, io_threads))
        stages.leave(RestoreStage.VERIFY)

        await stages.enter(RestoreStage.CHECK)
        _check_pids_free(manifest["workload"]["pids"])
        recorded = CudaState.from_manifest(manifest)
        await cuda.check_restore(recorded, os.getpid())
        stages.leave(RestoreStage.CHECK)

        await stages.enter(RestoreStage.CRIU)
        work_dir.mkdir(parents=True, exist_ok=True)
        lock = manifest.get("criu", {}).get("networkLock", settings.network_lock)
        options = criu.RestoreOptions.configured(
            settings,
            images_dir=str(images),
            work_dir=str(work_dir),
            pid_ns_fd=None,
            net_ns_fd=None,
            external_mounts={},
            root=None,
            libdir=_plugins_dir(bundle),
        )
        argv = [*options.argv(), *(["--network-lock", lock] if lock else []), *(["--leave-stopped"] if overlap else [])]
        if not overlap:
            if prefetch:
                warm = Prefetch(prefetch, threads=prefetch_threads).start()
            await criu.run("restore", [*bundle.command(), *argv], work_dir / options.log_file)
            restored = int(pidfile.read_text())
        else:
            pages = PageCheck(images, manifest, io_threads)
            async with lifecycle.background() as group:
                group.start_soon(pages.run)
                if prefetch:
                    warm = Prefetch(prefetch, threads=prefetch_threads)
                    group.start_soon(pages.then_prefetch, warm)
                await criu.run("restore", [*bundle.command(), *argv], work_dir / options.log_file)
                restored = int(pidfile.read_text())
                await pages.result()  # a bad page: the stopped tree is killed below
            stages.seconds["verify-pages"] = pages.seconds
            for member in procfs.process_tree(restored):  # every byte verified: let the restored tasks run
                os.kill(member, signal.SIGCONT)
        stages.leave(RestoreStage.CRIU)

        await stages.enter(RestoreStage.CUDA)
        await cuda.restore(procfs.process_tree(restored), recorded)
        stages.leave(RestoreStage.CUDA)
    except BaseException as exc:
        bound.error("tree restore failed", error=str(exc), restored_pid=restored)
        if warm is not None:
            warm.stop()
        if restored is None and pidfile.exists():  # CRIU finished, the verification did not
            with contextlib.suppress(ValueError, OSError):
                restored = int(pidfile.read_text())
        if restored is not None:
            _kill_tree(restored)
        raise
    pairs = list(getattr(cuda, "gpu_pairs", []))
    with contextlib.suppress(OSError):
        await anyio.to_thread.run_sync(artifact.prune_restore_logs, base / checkpoint_id / artifact.RESTORES)
    bound.info("tree restored", pid=restored, seconds={k: round(v, 3) for k, v in stages.seconds.items()})
    return TreeRestore(restored, manifest, dict(stages.seconds), work_dir / options.log_file, warm, pairs)


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
