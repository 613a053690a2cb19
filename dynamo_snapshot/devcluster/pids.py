"""The processes a local cluster started, recorded by PID, so that ``make stop`` stops exactly those
(after ``dynamo-snapshot demo --keep`` the starting process is gone; a command-line pattern would also
hit other clusters' processes and anything that mentions the path).

    <cluster root>/pids/<component>.pid   "<pid> <start time in clock ticks since boot>"

Each component runs in a session of its own (its PID is its process group's); the start time guards
against a PID that was reused since. ``stop_recorded`` stops the newest first (the agent before the
kubelet before the API server), SIGTERM then SIGKILL after a grace period.

    python -m dynamo_snapshot.devcluster.pids stop DIRECTORY
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

GRACE_S = 20.0


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of stat; fields after the command name


def record(root: Path, name: str, pid: int) -> None:
    directory = root / "pids"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.pid"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid} {_start_time(pid) or ''}\n")
    tmp.replace(path)


def forget(root: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / "pids" / f"{name}.pid").unlink()


def _alive(pid: int, started: str) -> bool:
    return _start_time(pid) == started


def stop_recorded(directory: Path) -> list[str]:
    """Stop every recorded process below ``directory`` that is still the one recorded; returns their names."""
    files = sorted(Path(directory).resolve().rglob("pids/*.pid"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    stopped = []
    for path in files:
        pid_text, _, started = path.read_text().strip().partition(" ")
        pid = int(pid_text)
        if started and _alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while _alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.1)  # not our child: nothing to wait on but its /proc entry
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            stopped.append(path.stem)
        path.unlink()
    return stopped


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "stop":
        sys.exit("usage: python -m dynamo_snapshot.devcluster.pids stop DIRECTORY")
    for name in stop_recorded(Path(sys.argv[2])):
        print(f"stopped {name}")
