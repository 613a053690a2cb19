"""The checkpoint guard: a small process that cleans up if the checkpoint pipeline dies.

Between freezing a workload and promoting its artifact, the pipeline holds the workload frozen or
stopped (and, with CUDA, locked). If the pipeline is killed there, nothing in it can clean up, so
every checkpoint starts this guard first. The guard reads commands on its stdin from the pipeline:

    watch <pid>      also kill this process on failure (the running CRIU)
    promoted <dir>   the artifact was promoted to <dir>: on failure, withdraw it too
    confirmed        the promoted artifact was confirmed: keep it, whatever happens next
    disarm           the checkpoint succeeded (or the pipeline cleaned up itself): exit, do nothing

End of input without ``disarm`` (the pipeline finished with an error or died) makes the guard kill
the watched processes, SIGKILL the workload (every process of the container's cgroup but its
init), thaw the cgroup, withdraw an unconfirmed promoted artifact and remove the staging directory,
keeping CRIU's log in
``<base>/<checkpointID>/failed/<attempt>/dump.log``. The pipeline's own error path uses the
same guard (it closes the pipe and waits), so there is one cleanup, whichever way it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import structlog

from dynamo_snapshot.agent.artifact.layout import discard_staging, withdraw
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
) -> list[int]:
    """Kill what the pipeline left behind; returns the killed workload PIDs."""
    for pid in watched:
        _kill_and_wait(pid)  # CRIU first: it may re-freeze the cgroup on its way out
    killed = freezer.kill_all_but(spare)
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
    unconfirmed: Path | None = None
    for line in sys.stdin:
        command, _, value = line.strip().partition(" ")
        if command == "disarm":
            return 0
        if command == "watch" and value.isdigit():
            watched.append(int(value))
        elif command == "promoted" and value:
            unconfirmed = Path(value)
        elif command == "confirmed":
            unconfirmed = None
    killed = clean_up(freezer, args.spare, watched, args.staging, args.keep_log_at, unconfirmed)
    print(
        f"checkpoint-guard: pipeline ended without success; killed workload {killed}, thawed {args.freezer}",
        file=sys.stderr,
    )
    return 0


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

    async def confirmed(self) -> None:
        await self._send("confirmed")

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
