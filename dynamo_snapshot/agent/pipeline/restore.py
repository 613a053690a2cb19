"""The restore pipeline, one for every target (a placeholder container or the host: ``target.py``).

    resolve   the target (a placeholder: looked up once, then checked to be in standby)
    fetch     (object storage only: ``request.remote``) the version's manifest authenticated from the
              bucket, then the version downloaded into the node cache (``request.cache``, required) within
              its budget, each chunk checked against that manifest as it lands, and pinned
              (``artifact/remote.py``; an entry cached already is pinned as it is); the stages below
              read that entry as they read any node cache hit
    verify    manifest, checkpoint ID, compatibility, every file's size; every file but the raw page
              data copied to the agent's private directory and the SHA-256 of the copies checked (what
              CRIU and the agent parse is what was verified: ``artifact/private.py``); the target's own
              checks (the placeholder has the checkpoint's mounts); the GPUs the target can see cover
              the checkpoint's. The page data (most of the bytes) is read ahead of CRIU from here on
              by parallel readers and verified after CRIU, in the restored memory
              (``artifact/memcheck.py``; without ``overlap`` it is also verified on storage here). With
              a node cache (``artifact/nodecache.py``) holding this version bound to the authenticated
              manifest, everything is read from that pinned entry instead, and the page data needs no
              check (verified when cached, agent-private); after a restore from storage the cache is
              filled in the background
    pids      the checkpoint's PIDs: reserved in the placeholder's namespace, or free on the host
    rootfs    delete what the workload had deleted, then extract rootfs-diff.tar (confined)
    dev-shm   refill /dev/shm from dev-shm.tar
    criu      CRIU restores the subtree with its PIDs, in the target's namespaces; its tasks stay
              stopped (``--leave-stopped``). Once the page data is read, the declared files
              (``rereadAfterRestore``, the worker's weights, and any the caller names) are read into
              the page cache in the background
    verify-memory  every page byte CRIU copied into the held tasks' memory checked against its digest
              there (``artifact/memcheck.py``; nothing to do for a node-cache hit), then SIGCONT
    cuda      restore GPU state and unlock (no-op without CUDA)
    signal    restore-complete, naming the restored workload's PID, into the control directory
    (after)   old restore logs are pruned (best effort)

Failure rule: any failure from the resolve on kills the target (a placeholder's init, so the runtime
restarts the container cleanly; a tree restored in part) and stops the prefetch.

A check that must pass before anything is parsed or changed belongs in ``_verify``.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot import lifecycle
from dynamo_snapshot.agent.artifact import authn, beneath, nodecache, private, verification
from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact.memcheck import MemoryCheck, Verified
from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.artifact.private import PrivateImages
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda.state import CudaState
from dynamo_snapshot.agent.cuda.step import CudaStep, NoCuda
from dynamo_snapshot.agent.errors import RestoreError
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.pipeline.hooks import NO_HOOKS, Hooks
from dynamo_snapshot.agent.pipeline.stages import Request, Stages
from dynamo_snapshot.agent.pipeline.target import Destination, RestoreTarget, declared_files

log = structlog.get_logger(__name__)

PIDFILE = "restored.pid"


@dataclass(frozen=True)
class RestoreRequest(Request):
    work_dir: Path | None = None  # CRIU's restore.log and pidfile; default <base>/<id>/restores/<target's name>
    prefetch_threads: int = 8  # 0: no prefetch
    prefetch: Sequence[Path] = ()  # files to read ahead besides the declared ones
    overlap: bool = True  # start CRIU before the page data is verified (False: verified on storage first too)
    private_root: Path = private.DEFAULT_ROOT  # node-local, the agent's only: the copies of the parsed files
    cache: nodecache.NodeCache | None = None  # read a complete cached copy; after a restore from storage, fill it


class Stage(enum.StrEnum):
    RESOLVE = "resolve"
    FETCH = "fetch"
    VERIFY = "verify"
    PIDS = "pids"
    ROOTFS = "rootfs"
    DEV_SHM = "dev-shm"
    CRIU = "criu"
    VERIFY_MEMORY = "verify-memory"
    CUDA = "cuda"
    SIGNAL = "signal"


@dataclass(frozen=True)
class RestoreResult:
    workload_pid: int  # PID of the restored subtree's root as the workload sees it
    host_pid: int
    manifest: dict[str, Any]
    log_path: Path
    seconds: dict[str, float]  # per stage, one after the other
    background_seconds: dict[str, float] = field(default_factory=dict)  # work that overlapped the stages
    prefetch: Prefetch | None = None  # the declared files, still being read: .wait() for the result
    source: str = "storage"  # where its images were read: "node-cache" (a pinned entry; every S3 restore) or "storage"


class _Run:
    """One restore's state, shared by its stages."""

    def __init__(self, request: RestoreRequest, bundle: criu.CriuBundle, cuda: CudaStep, hooks: Hooks,
                 settings: criu.CriuSettings, bound: Any):
        self.request, self.bundle, self.cuda, self.settings, self.bound = request, bundle, cuda, settings, bound
        self.stages = Stages[Stage]("restore", bound, hooks)
        layout = artifact_layout.ArtifactLayout(request.base_path, request.checkpoint_id, request.artifact_version)
        self.stored = layout.final_dir  # on storage: others may write there
        self.private: PrivateImages | nodecache.Pinned | None = None  # what is read: verified copies
        self.cached = False  # read from the node cache: every byte verified already, the page data included
        self.restores = request.base_path / request.checkpoint_id / artifact_layout.RESTORES
        self.warm: Prefetch | None = None
        self.host_pid: int | None = None
        self.work_dir: Path | None = None
        self.pages: MemoryCheck | Verified = Verified()
        self.touched = False  # the target was changed (root filesystem, /dev/shm, CRIU): a failure kills it
        self.keyring = request.keyring or authn.default_keyring()

    async def here(self) -> artifact.Compatibility:
        node = await self.cuda.node_state()
        return artifact.Compatibility.of_this_node(
            await anyio.to_thread.run_sync(self.bundle.version), node.driver_version, node.gpus, node.gpu_models
        )

    async def fetch(self, here: artifact.Compatibility, remote: ObjectStorage) -> dict[str, Any]:
        """Object storage: the version as a pinned node cache entry (downloaded into it, verified, unless
        it is there); returns the manifest authenticated from the bucket."""
        request = self.request
        if request.cache is None:
            raise RestoreError(f"restoring {request.checkpoint_id} from {remote.describe_root()} needs a node cache "
                               "(the version is fetched into it): configure cache.dir and cache.budgetGiB")
        self.private, manifest = await remote.fetch(request.cache, request.checkpoint_id, request.artifact_version,
                                                    self.keyring, here, request.namespace)
        self.stored, self.cached = self.private.path, True
        request.base_path.mkdir(mode=0o700, parents=True, exist_ok=True)  # node-local: the restore's logs go there
        return manifest

    async def verify(self, dest: Destination, here: artifact.Compatibility,
                     fetched: dict[str, Any] | None) -> tuple[dict[str, Any], CudaState]:
        wanted, threads = self.request.checkpoint_id, self.request.io_threads
        manifest = fetched
        if manifest is None:  # storage the pipeline reads in place (a PVC), or the node cache's copy of it
            manifest = await anyio.to_thread.run_sync(authn.verify_listing, self.stored, wanted, here, self.keyring)
            verification.check_namespace(manifest, self.request.namespace, str(self.stored))
            self.private = await anyio.to_thread.run_sync(nodecache.restore_images, self.request.cache, self.stored,
                                                          manifest, self.request.artifact_version,
                                                          self.request.private_root, threads)
            self.cached = isinstance(self.private, nodecache.Pinned)
        if not self.request.overlap and not self.cached:
            pages = self.pages_dir
            await anyio.to_thread.run_sync(
                lambda: verification.verify_digests(pages, manifest, verification.is_page_data, threads))
        await anyio.to_thread.run_sync(dest.check, manifest, self.images)
        recorded = CudaState.from_manifest(manifest)
        await self.cuda.check_restore(recorded, dest.gpu_view_pid)  # GPUs the target cannot provide: refuse now
        return manifest, recorded

    @property
    def images(self) -> Path:
        assert self.private is not None
        return self.private.path

    @property
    def pages_dir(self) -> Path:
        """Where the page data is read and checked: the stored version (the private links name it)."""
        return self.stored

    def prefetch(self, dest: Destination, manifest: dict[str, Any]) -> Prefetch | None:
        request = self.request
        files = [*declared_files(manifest), *map(str, request.prefetch)] if request.prefetch_threads > 0 else []
        if not files:
            return None
        self.warm = Prefetch(files, threads=request.prefetch_threads, root=dest.prefetch_root)
        return self.warm

    async def criu(self, dest: Destination, manifest: dict[str, Any]) -> int:
        assert self.work_dir is not None
        beneath.make_dirs(self.request.base_path, self.work_dir)  # <id>/restores/<name>, never through a link
        await dest.run_criu(self.bundle, self.images, self.work_dir, manifest, self.settings, ["--leave-stopped"])
        workload_pid = int((self.work_dir / PIDFILE).read_text())
        self.host_pid = dest.host_pid(workload_pid)
        if self.host_pid is None:
            raise RestoreError(f"restored workload PID {workload_pid} is not running in {dest.name}")
        return workload_pid

    async def verify_memory(self, dest: Destination) -> None:
        """The page data checked in the restored memory; only then do the held tasks run."""
        assert self.host_pid is not None
        await self.pages.result(dest.host_pid)  # a bad page kills the target, and the stopped tasks with it
        for member in procfs.process_tree(self.host_pid):
            os.kill(member, signal.SIGCONT)

    async def stages_after_resolve(self, dest: Destination) -> tuple[dict[str, Any], int]:
        enter, leave = self.stages.enter, self.stages.leave
        here = await self.here()
        fetched = None
        if self.request.remote is not None:
            await enter(Stage.FETCH)
            fetched = await self.fetch(here, self.request.remote)
            leave(Stage.FETCH)
        await enter(Stage.VERIFY)
        manifest, recorded = await self.verify(dest, here, fetched)
        leave(Stage.VERIFY)

        pages: MemoryCheck | Verified = Verified()
        if isinstance(self.private, PrivateImages):  # not from the node cache: checked in memory after CRIU
            pages = MemoryCheck(self.pages_dir, self.private.layout, manifest, self.request.io_threads)
        self.pages = pages
        async with lifecycle.background() as group:
            group.start_soon(pages.run)

            await enter(Stage.PIDS)
            await dest.reserve_pids(manifest["workload"]["pids"])
            leave(Stage.PIDS)

            await enter(Stage.ROOTFS)
            self.touched = True
            await dest.restore_rootfs(self.images)
            leave(Stage.ROOTFS)

            await enter(Stage.DEV_SHM)
            await dest.restore_dev_shm(self.images)
            leave(Stage.DEV_SHM)

            if warm := self.prefetch(dest, manifest):
                group.start_soon(pages.then_prefetch, warm)

            await enter(Stage.CRIU)
            workload_pid = await self.criu(dest, manifest)
            leave(Stage.CRIU)

            await enter(Stage.VERIFY_MEMORY)
            await self.verify_memory(dest)
            leave(Stage.VERIFY_MEMORY)

        await enter(Stage.CUDA)
        assert self.host_pid is not None
        await self.cuda.restore(procfs.process_tree(self.host_pid), recorded)
        leave(Stage.CUDA)

        await enter(Stage.SIGNAL)
        await dest.tell_restored(self.request.checkpoint_id, workload_pid)
        leave(Stage.SIGNAL)
        return manifest, workload_pid

    def failed(self, dest: Destination, exc: BaseException) -> None:
        self.bound.error("restore failed", error=str(exc), restored_pid=self.host_pid)
        if self.warm is not None:
            self.warm.stop()
        pidfile = self.work_dir / PIDFILE if self.work_dir is not None else None
        if self.host_pid is None and pidfile is not None and pidfile.exists():  # CRIU finished, the rest did not
            with contextlib.suppress(ValueError, OSError):
                self.host_pid = dest.host_pid(int(pidfile.read_text()))
        if self.touched or self.host_pid is not None:  # refused before any change: the target stays as it was
            dest.kill(self.host_pid)

    async def prune(self) -> None:
        """Old restore logs go after a restore that worked (best effort: storage may be read-only)."""
        try:
            removed = await anyio.to_thread.run_sync(artifact_layout.prune_restore_logs, self.restores)
        except (OSError, beneath.UnsafePath) as exc:
            self.bound.warning("could not prune old restore logs", directory=str(self.restores), error=str(exc))
            return
        if removed:
            self.bound.info("pruned old restore logs", directory=str(self.restores), removed=len(removed))


async def restore(target: RestoreTarget, request: RestoreRequest, bundle: criu.CriuBundle, cuda: CudaStep | None = None,
                  hooks: Hooks = NO_HOOKS, settings: criu.CriuSettings | None = None) -> RestoreResult:
    bound = log.bind(**target.describe, checkpoint_id=request.checkpoint_id)
    run = _Run(request, bundle, cuda or NoCuda(), hooks, settings or criu.CriuSettings(), bound)

    await run.stages.enter(Stage.RESOLVE)
    dest = await target.resolve()
    try:
        dest.ready()
        run.work_dir = request.work_dir or dest.work_dir(run.restores)
        run.stages.leave(Stage.RESOLVE)
        manifest, workload_pid = await run.stages_after_resolve(dest)
    except BaseException as exc:
        run.failed(dest, exc)
        raise
    finally:
        if run.private is not None:
            run.private.close()
    await run.prune()
    if not run.cached:
        nodecache.fill_after_restore(request.cache, run.stored, manifest, request.artifact_version)
    assert run.host_pid is not None
    background = {"prefetch-pages": run.pages.prefetch_seconds}
    bound.info("restored", workload_pid=workload_pid, seconds=run.stages.rounded(), from_cache=run.cached,
               verify_memory_seconds=round(run.pages.seconds, 3), verified_bytes=run.pages.checked_bytes)
    return RestoreResult(
        workload_pid=workload_pid,
        host_pid=run.host_pid,
        manifest=manifest,
        log_path=run.work_dir / "restore.log",
        seconds=run.stages.seconds,
        background_seconds=background,
        prefetch=run.warm,
        source="node-cache" if run.cached else "storage",
    )
