"""The checkpoint pipeline, one for every target (a container or a host process tree: ``target.py``).

    resolve   the target -> its workload subtree, every thread of it, its stdio and mounts (once;
              the resolved source is handed down to every later stage)
    cuda      lock and checkpoint the subtree's CUDA processes (no-op without CUDA)
    freeze    freeze the container's cgroup (a tree: nothing, CRIU stops it)
    dump      CRIU dump of the subtree; ``dump-running`` is heard once CRIU's process runs; meanwhile
              the page images are digested as CRIU appends to them (``artifact/following.py``)
    rootfs    overlay upper dir -> rootfs-diff.tar + deleted-files.json (still frozen; a tree: none)
    dev-shm   /dev/shm contents -> dev-shm.tar (still frozen; a tree: none)
    manifest  every file's size and SHA-256, written last (``target.manifest_fields``): the page
              images' digests from the dump stage where nothing doubts them, every other file hashed here
    promote   one rename from versions/tmp/<uuid> to versions/<artifactVersion>
    upload    (object storage only: ``request.remote``) the promoted version into the bucket, the manifest
              last; still frozen, so a failure here is undone like any other before the confirmation
    confirm   the hooks' confirmation (the agent annotates the checkpoint Job), still frozen
    release   thaw; the source gets its GPU state back; tell the workload snapshot-complete. A source
              not held frozen until the confirmation (``Source.held_until_confirmed``: a tree, which
              CRIU leaves running) gets its GPU state back from the end of the dump on, overlapping
              manifest..confirm; snapshot-complete and the guard's disarm stay after the confirmation

``resume_source`` is the release for a source whose pipeline died at the confirmation or after it (its
guard thawed it and kept it): the GPU state back by each process's driver state, then, if the verdict
says completed, snapshot-complete.

Failure rule: the source's guard (armed before the first step that changes the workload) undoes
everything before the confirmation: a container's guard process kills and thaws the workload even if
this process dies, removes the staging directory and takes an unconfirmed version back out of
``versions/``; then the CUDA lock is undone. From the confirmation on, a dead pipeline's guard only
thaws (the verdict may be written; the agent settles it when back). A failure at the release only
costs the workload: the checkpoint is stored. With the GPU state coming back early (a tree), a failure
before the confirmation first waits for it, then undoes as always (``cuda.abort`` finds nothing
locked; the tree runs on, as after any failed tree checkpoint); a failure of the early return itself
is the release's failure, met at the release stage: the checkpoint is still confirmed and kept, the
workload killed. A container is held frozen to the confirmation: its guard's kill (every process of
the cgroup) is complete only while nothing in it can fork, and a GPU state brought back to a frozen
cgroup has not been measured on a GPU.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.artifact import authn, following, layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.cuda.step import CudaStep, NoCuda
from dynamo_snapshot.agent.errors import AgentError, CriuFailed
from dynamo_snapshot.agent.pipeline.hooks import NO_HOOKS, Hooks
from dynamo_snapshot.agent.pipeline.stages import Request, Stages
from dynamo_snapshot.agent.pipeline.target import CheckpointTarget, Guard, Source, manifest_fields

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CheckpointRequest(Request):
    release: bool = True  # give the source its GPU state back (False: left CUDA-checkpointed)
    digest_during_dump: bool = True  # hash the page images while CRIU writes them (False: all at the manifest)


class Stage(enum.StrEnum):
    RESOLVE = "resolve"
    CUDA = "cuda"
    FREEZE = "freeze"
    DUMP = "dump"
    DUMP_RUNNING = "dump-running"  # CRIU has started and not finished (heard, not timed)
    ROOTFS = "rootfs"
    DEV_SHM = "dev-shm"
    MANIFEST = "manifest"
    PROMOTE = "promote"
    UPLOAD = "upload"
    CONFIRM = "confirm"
    RELEASE = "release"


RELEASE_EARLY = "release-gpu-early"  # seconds of the GPU state's return during manifest..confirm (not a stage)


@dataclass(frozen=True)
class CheckpointResult:
    directory: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]  # per stage
    workload_notified: bool
    digested_during_dump: tuple[str, ...] = ()  # the files whose digests the dump stage computed

    @property
    def image_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest.get("files") or [])


class _Run:
    """One checkpoint's state, shared by its stages."""

    def __init__(self, request: CheckpointRequest, bundle: criu.CriuBundle, cuda: CudaStep, hooks: Hooks,
                 settings: criu.CriuSettings, bound: Any):
        self.request, self.bundle, self.cuda, self.hooks, self.settings = request, bundle, cuda, hooks, settings
        self.bound = bound
        self.stages = Stages[Stage]("checkpoint", bound, hooks)
        self.layout = layout.ArtifactLayout(request.base_path, request.checkpoint_id, request.artifact_version)
        self.keyring = request.keyring or authn.default_keyring()  # before anything is touched: no key, no checkpoint
        self.digested_during_dump: tuple[str, ...] = ()
        self.released_early = False
        self.early_failure: Exception | None = None

    async def dump(self, source: Source, guard: Guard, staging: Path,
                   follower: following.Follower | None) -> criu.DumpOptions:
        options = source.dump_options(self.settings, staging, self.bundle)

        async def started(pid: int) -> None:
            if follower is not None:
                follower.writer(pid)
            await guard.watch(pid)
            await self.hooks.on_stage(Stage.DUMP_RUNNING)
            await self.hooks.dump_started(pid)

        argv = source.dump_argv(self.bundle, options)
        await criu.run("dump", argv, staging / options.log_file, on_started=started)
        if follower is not None:
            await anyio.to_thread.run_sync(follower.writer_exited)
        return options

    async def capture(self, source: Source, guard: Guard, staging: Path) -> tuple[criu.DumpOptions, list[str],
                                                                                  list[str], dict]:
        """The dump, rootfs and dev-shm stages, then (entering the manifest stage) the page images' digests
        the dump stage computed: the options CRIU ran with, the rootfs entries and deleted paths, the digests."""
        enter, leave = self.stages.enter, self.stages.leave
        await enter(Stage.DUMP)
        follower = None
        if self.request.digest_during_dump:
            follower = await anyio.to_thread.run_sync(following.Follower.start, staging, self.request.io_threads)
        try:
            options = await self.dump(source, guard, staging, follower)
            leave(Stage.DUMP)

            await enter(Stage.ROOTFS)
            archived, deleted = await source.capture_rootfs(staging)
            leave(Stage.ROOTFS)

            await enter(Stage.DEV_SHM)
            await source.capture_dev_shm(staging)
            leave(Stage.DEV_SHM)

            await enter(Stage.MANIFEST)
            hashed = await anyio.to_thread.run_sync(follower.finish) if follower is not None else {}
        finally:
            if follower is not None:
                follower.close()  # a failure: the readers stop, no early digest outlives the attempt
        return options, archived, deleted, hashed

    async def store(self, source: Source, guard: Guard, staging: Path, criu_version: str) -> tuple[Path, dict]:
        enter, leave = self.stages.enter, self.stages.leave
        await enter(Stage.CUDA)
        await self.cuda.prepare(source.workload.host_tasks)
        cuda_state = await self.cuda.checkpoint()
        leave(Stage.CUDA)

        await enter(Stage.FREEZE)
        await anyio.to_thread.run_sync(source.freeze)
        leave(Stage.FREEZE)

        options, archived, deleted, hashed = await self.capture(source, guard, staging)
        self.digested_during_dump = tuple(sorted(hashed))
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            if self.request.release and not source.held_until_confirmed():
                tg.start_soon(self.gpu_back_early)  # a failure below waits for it, then undoes as always
            try:
                kept = await self.keep(source, guard, staging, criu_version, cuda_state, options, archived,
                                       deleted, hashed)
            except Exception as exc:  # raised as itself once the early release is done, not in a group
                failure = exc
        if failure is not None:
            raise failure
        return kept

    async def gpu_back_early(self) -> None:
        """A source CRIU left running gets its GPU state back while the dump is kept (``release_early``);
        shielded: the driver calls finish before a failure's undo (``cuda.abort``) runs."""
        started = time.monotonic()
        with anyio.CancelScope(shield=True):
            try:
                await self.cuda.release()
            except Exception as exc:
                self.early_failure = exc  # the release stage handles it as its own failure
        self.released_early = True
        self.stages.seconds[RELEASE_EARLY] = time.monotonic() - started

    async def keep(self, source: Source, guard: Guard, staging: Path, criu_version: str, cuda_state: Any,
                   options: criu.DumpOptions, archived: list[str], deleted: list[str],
                   hashed: dict) -> tuple[Path, dict]:
        """The rest of the manifest stage, then promote, upload and confirm."""
        enter, leave = self.stages.enter, self.stages.leave
        here = artifact.Compatibility.of_this_node(
            criu_version, cuda_state.driver_version, cuda_state.gpus, cuda_state.gpu_models
        )
        request, workload = self.request, source.workload
        fields = manifest_fields(
            request.checkpoint_id, request.artifact_version, artifact.now_rfc3339(), here, workload,
            archived, deleted, options, cuda_state.manifest_block(workload.vpid_of), request.namespace,
        )
        write = authn.write_manifest
        manifest = await anyio.to_thread.run_sync(write, staging, fields, self.keyring, request.io_threads, hashed)
        leave(Stage.MANIFEST)

        await enter(Stage.PROMOTE)
        final = await anyio.to_thread.run_sync(self.layout.promote, staging)
        await guard.promoted(final)
        leave(Stage.PROMOTE)

        if request.remote is not None:
            await enter(Stage.UPLOAD)
            await request.remote.upload(final, request.checkpoint_id, request.artifact_version, self.keyring)
            leave(Stage.UPLOAD)

        await enter(Stage.CONFIRM)
        await guard.confirming()  # from here a dead pipeline's workload and artifact wait for the verdict
        try:
            await self.hooks.confirm(final)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await guard.not_confirmed()
                await self.withdraw_upload(manifest)
            raise
        leave(Stage.CONFIRM)
        return final, manifest

    async def withdraw_upload(self, manifest: dict[str, Any]) -> None:
        """A version whose confirmation failed is taken back out of the bucket too (best effort: a later
        attempt uncommits what is left, ``uncommit_earlier``)."""
        request = self.request
        if request.remote is None:
            return
        try:
            await request.remote.withdraw(request.checkpoint_id, request.artifact_version, manifest)
        except (OSError, AgentError) as exc:
            self.bound.warning("could not withdraw the unconfirmed upload; the next attempt will",
                               location=request.remote.describe(request.checkpoint_id, request.artifact_version),
                               error=str(exc))

    async def uncommit_earlier(self) -> None:
        """An earlier attempt's commit in the bucket, never confirmed (its agent died, or its withdrawal
        failed), taken back as the local version is (``layout.withdraw_unconfirmed``)."""
        request = self.request
        if request.remote is not None and await request.remote.uncommit(request.checkpoint_id,
                                                                         request.artifact_version):
            self.bound.warning("withdrew an unconfirmed commit an earlier attempt left in the bucket; "
                               "uploading afresh",
                               location=request.remote.describe(request.checkpoint_id, request.artifact_version))

    async def release(self, source: Source, guard: Guard) -> bool:
        """The checkpoint is stored and confirmed: a failure here only costs the workload (killed)."""
        await self.stages.enter(Stage.RELEASE)
        try:
            # Thaw before disarming: dying in between leaves a thawed workload the agent settles when back.
            source.thaw()
            await guard.disarm()
            if self.early_failure is not None:
                raise self.early_failure
            if self.request.release and not self.released_early:
                await self.cuda.release()  # a CUDA-locked source would hang in its first CUDA call
        except Exception as exc:
            self.bound.error("the source could not be released; killing it (the checkpoint is stored)",
                             error=str(exc))
            source.kill_workload()
            with anyio.CancelScope(shield=True):
                await guard.trip()  # thaws (it keeps a confirmed artifact); a no-op once disarmed
            return False
        notified = await source.tell_stored(self.request.checkpoint_id, self.request.artifact_version)
        self.stages.leave(Stage.RELEASE)
        return notified


async def checkpoint(target: CheckpointTarget, request: CheckpointRequest, bundle: criu.CriuBundle,
                     cuda: CudaStep | None = None, hooks: Hooks = NO_HOOKS,
                     settings: criu.CriuSettings | None = None) -> CheckpointResult:
    cuda = cuda or NoCuda()
    bound = log.bind(**target.describe, checkpoint_id=request.checkpoint_id)
    run = _Run(request, bundle, cuda, hooks, settings or criu.CriuSettings(), bound)

    await run.stages.enter(Stage.RESOLVE)
    source = await target.resolve()
    criu_version = await anyio.to_thread.run_sync(bundle.version)
    if await anyio.to_thread.run_sync(run.layout.withdraw_unconfirmed):
        bound.warning("withdrew an unconfirmed version an earlier attempt left; dumping afresh",
                      directory=str(run.layout.final_dir))
    await run.uncommit_earlier()
    staging = run.layout.new_staging()
    run.stages.leave(Stage.RESOLVE)

    kept_log = run.layout.failed_log(staging)
    guard = await source.arm(staging, kept_log)
    try:
        final, manifest = await run.store(source, guard, staging, criu_version)
    except BaseException as exc:
        bound.error("checkpoint failed; undoing it", error=str(exc))
        with anyio.CancelScope(shield=True):
            try:
                # Kill first: the workload may be frozen, and undoing a CUDA lock needs it running.
                await guard.trip()
            finally:
                await cuda.abort()
        if isinstance(exc, CriuFailed) and kept_log.exists():
            exc.log_path = str(kept_log)
        raise

    notified = await run.release(source, guard)
    bound.info("checkpoint stored", directory=str(final), seconds=run.stages.rounded())
    return CheckpointResult(directory=final, manifest=manifest, seconds=run.stages.seconds,
                            workload_notified=notified, digested_during_dump=run.digested_during_dump)



class Settled(enum.StrEnum):
    """What became of a source a dead pipeline left (``settle_source``)."""

    RELEASED = "released"  # confirmed: GPU state back, told snapshot-complete
    UNTOUCHED = "untouched"  # no verdict, never frozen or CUDA-locked: a fresh attempt may take it
    KILLED = "killed"  # no verdict and the dump had begun: killed, as its guard would have
    GONE = "gone"  # no workload left


async def settle_source(target: CheckpointTarget, cuda: CudaStep, told: tuple[str, str] | None) -> Settled:
    """Finish what a dead pipeline left of a source (its guard, if it survived, has finished). With ``told``
    (checkpoint ID, artifact version: the verdict says completed) the release: thaw, each CUDA process's
    GPU state back by what the driver says of it, ``snapshot-complete``. Without: a workload the dump had
    begun on (frozen, stopped, CUDA-locked) is killed; an untouched one is left for a fresh attempt."""
    try:
        source = await target.resolve()
    except AgentError as exc:
        log.info("no workload left to settle", **target.describe, reason=str(exc))
        return Settled.GONE
    bound = log.bind(**target.describe)
    touched = source.touched()
    source.thaw()
    resumed = await cuda.resume(source.workload.host_tasks)
    if told is not None:
        await source.tell_stored(*told)
        bound.info("released a source its dead pipeline left", cuda_processes=resumed)
        return Settled.RELEASED
    if not touched and not resumed:
        return Settled.UNTOUCHED
    source.kill_workload()
    bound.warning("killed a source its dead pipeline had begun to dump", cuda_processes=resumed)
    return Settled.KILLED
