"""The checkpoint guard: a small process that cleans up if the checkpoint pipeline dies.

Between freezing a workload and promoting its artifact, the pipeline holds the workload frozen or
stopped (and, with CUDA, locked). If the pipeline is killed there, nothing in it can clean up, so
every checkpoint starts this guard first. The guard reads commands on its stdin from the pipeline:

    watch <pid>      also kill this process on failure (the running CRIU)
    promoted <dir>   the artifact was promoted to <dir>: on failure, withdraw it too
    confirming       the verdict is being written: from here the artifact and the workload are kept
    not-confirmed    the verdict could not be written: back to undoing everything on failure
    disarm           the checkpoint succeeded (or the pipeline cleaned up itself): exit, do nothing

End of input without ``disarm`` (the pipeline finished with an error or died) makes the guard kill
the watched processes, SIGKILL the workload (every process of the container's cgroup but its
init), thaw the cgroup, withdraw an unconfirmed promoted artifact and remove the staging directory,
keeping CRIU's log in
``<base>/<checkpointID>/failed/<attempt>/dump.log``. The pipeline's own error path uses the
same guard (it closes the pipe and waits), so there is one cleanup, whichever way it ends.

Once ``confirming`` is heard, a pipeline that dies may have written the verdict: the guard then only
thaws the workload and keeps the artifact. The agent, when it is back, settles the checkpoint by the
Job's verdict (``service/leftovers.py``): it finishes the release (CUDA state back, snapshot-complete)
when the verdict says completed, and otherwise gives the workload its GPU state back for a fresh
attempt, which withdraws the unconfirmed version first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import structlog

from dynamo_snapshot.agent.artifact.layout import discard_staging, withdraw
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.host.cgroups import Freezer

log = structlog.get_logger(__name__)
_KILL_WAIT_S = 10.0


def _kill_and_wait(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(int(_KILL_WAIT_S * 1000))
    finally:
        os.close(pidfd)


def clean_up(
    freezer: Freezer,
    spare: int,
    watched: list[int],
    staging: Path | None,
    keep_log_at: Path | None,
    unconfirmed: Path | None = None,
    keep_workload: bool = False,
) -> list[int]:
    """Kill what the pipeline left behind (but a workload whose verdict may be written: thawed only);
    returns the killed workload PIDs."""
    for pid in watched:
        _kill_and_wait(pid)  # CRIU first: it may re-freeze the cgroup on its way out
    killed = [] if keep_workload else freezer.kill_all_but(spare)
    freezer.thaw()
    if unconfirmed is not None:
        withdraw(unconfirmed)
    if staging is not None:
        discard_staging(staging, keep_log_at)
    return killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="checkpoint-guard")
    parser.add_argument("--freezer", required=True, type=Path)
    parser.add_argument("--cgroup-v2", action="store_true")
    parser.add_argument("--spare", required=True, type=int, help="host PID of the container's init")
    parser.add_argument("--staging", type=Path)
    parser.add_argument("--keep-log-at", type=Path, help="where the dump log of a failed attempt goes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pipeline's terminal or process group is not ours
    freezer = Freezer(args.freezer, v2=args.cgroup_v2)
    watched: list[int] = []
    promoted: Path | None = None
    confirming = False
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "disarm":
            return 0
        if command == "watch" and value.isdigit():
            watched.append(int(value))
        elif command == "promoted" and value:
            promoted = Path(value)
        elif command in ("confirming", "not-confirmed"):
            confirming = command == "confirming"
    if confirming:
        clean_up(freezer, args.spare, watched, None, None, keep_workload=True)
        print(f"checkpoint-guard: pipeline ended while or after confirming; thawed {args.freezer}, kept the "
              "workload and the artifact for the agent to settle by the Job's verdict", file=sys.stderr)
        return 0
    killed = clean_up(freezer, args.spare, watched, args.staging, args.keep_log_at, promoted)
    print(
        f"checkpoint-guard: pipeline ended without success; killed workload {killed}, thawed {args.freezer}",
        file=sys.stderr,
    )
    return 0


def running_guards(freezer: Path) -> list[int]:
    """PIDs of guard processes (of any agent, alive or dead) guarding the cgroup ``freezer``."""
    wanted = [b"dynamo_snapshot.agent.pipeline.guard", b"--freezer", str(freezer).encode()]
    found = []
    for entry in procfs.PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(part in argv for part in wanted):
            found.append(int(entry.name))
    return found


def wait_for_guards(freezer: Path, timeout_s: float = _KILL_WAIT_S * 3) -> list[int]:
    """Wait until no guard of ``freezer`` runs (an earlier agent's guard still cleaning up after it died),
    at most ``timeout_s``; the PIDs still running then. Blocking: run it in a thread."""
    pidfds = []
    for pid in running_guards(freezer):
        with contextlib.suppress(ProcessLookupError):
            pidfds.append(os.pidfd_open(pid))
    try:
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        remaining = set(pidfds)
        deadline = time.monotonic() + timeout_s
        while remaining and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(int(left * 1000)):
                remaining.discard(fd)
                poller.unregister(fd)
        return running_guards(freezer) if remaining else []
    finally:
        for fd in pidfds:
            os.close(fd)


class Guard:
    """The pipeline's handle on its guard process."""

    def __init__(self, process: anyio.abc.Process):
        self._process = process

    @classmethod
    async def start(cls, freezer: Freezer, spare: int, staging: Path, keep_log_at: Path) -> Guard:
        argv = [
            sys.executable,
            "-m",
            "dynamo_snapshot.agent.pipeline.guard",
            "--freezer",
            str(freezer.path),
            "--spare",
            str(spare),
            "--staging",
            str(staging),
            "--keep-log-at",
            str(keep_log_at),
        ]
        if freezer.v2:
            argv.append("--cgroup-v2")
        process = await anyio.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=None, start_new_session=True
        )
        return cls(process)

    async def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        await self._process.stdin.send(f"{line}\n".encode())

    async def watch(self, pid: int) -> None:
        await self._send(f"watch {pid}")

    async def promoted(self, directory: Path) -> None:
        await self._send(f"promoted {directory}")

    async def confirming(self) -> None:
        await self._send("confirming")

    async def not_confirmed(self) -> None:
        await self._send("not-confirmed")

    async def disarm(self) -> None:
        await self._send("disarm")
        await self._finish()

    async def trip(self) -> None:
        """Make the guard clean up now and wait until it has."""
        await self._finish()

    async def _finish(self) -> None:
        with anyio.CancelScope(shield=True):
            assert self._process.stdin is not None
            await self._process.stdin.aclose()
            code = await self._process.wait()
        if code != 0:
            log.error("checkpoint guard failed", returncode=code)


if __name__ == "__main__":
    sys.exit(main())
