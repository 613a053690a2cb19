"""snapshot-init: PID 1 of the placeholder image (stdlib only).

    snapshot-init [--] COMMAND [ARG...]
    snapshot-init --runtime-entrypoint [ARG...]

The second form is the ENTRYPOINT of images built by images/placeholder/Dockerfile: it runs what the
wrapped runtime image would run for a container with these args (its ENTRYPOINT followed by the args,
or by its CMD when there are none), as recorded in ``runtime-command.json`` at build time.

Cold start and checkpoint source: runs COMMAND as its only child. Restore pod
(``DYN_SNAPSHOT_RESTORE_STANDBY=1``): runs nothing and waits; the agent restores the checkpointed
process tree into this PID namespace, the tree's root is re-parented to this init, and
``restore-complete`` in the control directory names it. If the agent refuses the restore for good
(``restore-failed``: the checkpoint is altered, or made for another node), a pod with
``DYN_SNAPSHOT_RESTORE_FALLBACK=cold`` (the operator sets it for startupPolicy Immediate) starts COMMAND
cold instead, and any other keeps waiting (no crash loop; the pod's annotation says why). Either way
snapshot-init reaps every child, forwards termination and user signals to the workload, and exits with
the workload's status
(128 + N when a signal N ended it).

PIDs: CRIU restores the workload with the PIDs it had, so they must be free in the restore pod's
PID namespace, where this init, probes and the restore tooling also run. As PID 1 of a checkpoint
source, snapshot-init starts the workload at PID ``DYN_SNAPSHOT_WORKLOAD_PID_BASE`` (default 1000)
or above, by creating and joining short-lived threads until the namespace's PID counter gets there
(no privilege needed). Anything a restore pod starts before the restore gets a low PID; the agent
moves the counter above the checkpoint's PIDs before it starts its own tooling there.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from dynamo_snapshot.workload.control import (
    RESTORE_COMPLETE,
    RESTORE_FAILED,
    control_dir,
    restore_fallback_cold,
    restore_standby,
)

WORKLOAD_PID_BASE_ENV = "DYN_SNAPSHOT_WORKLOAD_PID_BASE"
DEFAULT_WORKLOAD_PID_BASE = 1000
# Signals a container runtime or a user sends to stop or poke the workload.
FORWARDED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# Signals that end the container while no workload exists yet (standby).
STOP_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
# How often a standby init looks for restore-complete (the stdlib has no file-change notification).
STANDBY_POLL_INTERVAL = 0.1
_NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
RUNTIME_ENTRYPOINT_FLAG = "--runtime-entrypoint"
# The wrapped runtime image's ENTRYPOINT and CMD, which the placeholder's own ENTRYPOINT drops from the
# image config; written next to the dynamo_snapshot package by images/placeholder/layout.py.
RUNTIME_COMMAND_FILE = Path(__file__).resolve().parents[2] / "runtime-command.json"


class UsageError(Exception):
    """snapshot-init cannot tell what to run (exit status 2)."""


def say(message: str) -> None:
    print(f"snapshot-init[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def exit_code(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def workload_pid_base(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    raw = environ.get(WORKLOAD_PID_BASE_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKLOAD_PID_BASE
    try:
        return max(int(raw), 0)
    except ValueError:
        say(f"ignoring {WORKLOAD_PID_BASE_ENV}={raw!r}: not an integer")
        return DEFAULT_WORKLOAD_PID_BASE


def advance_pid_counter(base: int, batch: int = 64) -> int:
    """Advance this PID namespace's counter so the next process gets a PID >= ``base``.

    Each thread takes a PID from the namespace, so creating and joining threads moves the counter
    without privilege (writing ns_last_pid would need CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).
    Returns the counter's final value, or -1 when it cannot be read.
    """
    try:
        last = int(_NS_LAST_PID.read_text())
    except (OSError, ValueError):
        return -1
    while last < base - 1:
        threads = [threading.Thread(target=int) for _ in range(min(batch, base - 1 - last))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        last = int(_NS_LAST_PID.read_text())
    return last


def children_of_self() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(pids)


def _recorded_argv(recorded_at: Path, recorded: dict, key: str) -> list[str]:
    value = recorded.get(key) or []  # null: the runtime image has none
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{recorded_at}: {key!r} is not a list of strings; rebuild the placeholder image")
    return value


def runtime_command(args: list[str], recorded_at: Path = RUNTIME_COMMAND_FILE) -> list[str]:
    """What the runtime image runs for a container with ``args``, by the OCI and Kubernetes rule: its
    ENTRYPOINT followed by the args, or by its CMD when the container gives none."""
    try:
        recorded = json.loads(recorded_at.read_text())
    except FileNotFoundError:
        raise UsageError(
            f"{RUNTIME_ENTRYPOINT_FLAG}: {recorded_at} is missing, so the runtime image's entrypoint is unknown; "
            "build the placeholder with `make placeholder-image` (images/placeholder/Dockerfile), "
            "or give the container a command"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{RUNTIME_ENTRYPOINT_FLAG}: cannot read {recorded_at}: {exc}") from None
    if not isinstance(recorded, dict):
        raise UsageError(f"{recorded_at} is not a JSON object; rebuild the placeholder image")
    entrypoint, cmd = (_recorded_argv(recorded_at, recorded, key) for key in ("entrypoint", "cmd"))
    argv = [*entrypoint, *(args or cmd)]
    if not argv:
        image = recorded.get("image") or "the runtime image"
        raise UsageError(f"{image} has neither ENTRYPOINT nor CMD and the container gave no args: set its command")
    return argv


class Init:
    def __init__(self, argv: list[str], standby: bool, control: Path | None,
                 cold_fallback: Callable[[], list[str]] | None = None):
        self.argv = argv
        self.standby = standby
        self.control = control
        self.cold_fallback = cold_fallback  # a refused restore: the command to start cold instead
        self.refused = False
        self.workload: int | None = None
        self.exited: dict[int, int] = {}  # pid -> exit code, for every child reaped
        self.pending: list[int] = []

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.pending.append(signum)

    def _install_signal_handlers(self) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop through the pipe
        return wake_r

    def _spawn(self) -> int:
        if os.getpid() == 1:
            base = workload_pid_base()
            if base > 1:
                advance_pid_counter(base)
        try:
            # Its own session: CRIU dumps a subtree only if its root leads its session.
            pid = os.posix_spawnp(self.argv[0], self.argv, dict(os.environ), setsid=True)
        except OSError as exc:
            say(f"cannot start {self.argv[0]!r}: {exc.strerror}")
            raise SystemExit(127 if isinstance(exc, FileNotFoundError) else 126) from None
        say(f"started workload {self.argv[0]!r} as PID {pid}")
        return pid

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = exit_code(status)

    def _restored_workload(self) -> int | None:
        """The restored tree's root, once the agent has written restore-complete."""
        if self.control is None:
            return None
        try:
            content = (self.control / RESTORE_COMPLETE).read_text()
        except OSError:
            return None
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            pid = int(json.loads(content).get("workloadPID"))
            if pid > 1:
                return pid
        children = children_of_self()
        if len(children) == 1:
            return children[0]
        say(f"restore-complete names no workload PID and there are {len(children)} children; still waiting")
        return None

    def _refusal(self) -> str | None:
        """The agent's reason, once it has refused this pod's restore for good (``restore-failed``)."""
        if self.control is None or self.refused:
            return None
        try:
            content = (self.control / RESTORE_FAILED).read_text()
        except OSError:
            return None
        if not content.strip():
            return None  # created, not yet written (the agent's write is atomic; another writer's may not be)
        self.refused = True
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            return str(json.loads(content).get("reason") or "no reason given")
        return "no reason given"

    def _after_refusal(self, reason: str) -> int | None:
        """Start cold (the pod's fallback), or keep waiting; an exit code when the command is unusable."""
        if self.cold_fallback is None:
            say(f"the agent refused the restore: {reason}; waiting (no restore fallback is set)")
            return None
        try:
            self.argv = self.cold_fallback()
        except UsageError as exc:
            say(f"the agent refused the restore ({reason}) and the cold start cannot run: {exc}")
            return 2
        if not self.argv:
            say(f"the agent refused the restore ({reason}) and the container has no command to start cold")
            return 2
        say(f"the agent refused the restore: {reason}; starting the workload cold (restore fallback)")
        self.workload = self._spawn()
        return None

    def _forward(self) -> int | None:
        """Forward pending signals; returns an exit code when a stop signal arrives with no workload."""
        pending, self.pending = self.pending, []
        for sig in pending:
            if self.workload is None:
                if sig in STOP_SIGNALS:
                    say(f"received {signal.Signals(sig).name} with no workload; exiting")
                    return 128 + sig
                continue
            try:
                os.kill(self.workload, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                say(f"not allowed to forward {signal.Signals(sig).name} to workload PID {self.workload}")
        return None

    def run(self) -> int:
        wake = self._install_signal_handlers()
        if self.standby:
            say(f"standby: waiting for the agent to restore the workload ({RESTORE_COMPLETE} in {self.control})")
        else:
            self.workload = self._spawn()
        while True:
            self._reap()
            if self.workload is None and self.standby:
                self.workload = self._restored_workload()
                if self.workload is not None:
                    say(f"adopted restored workload PID {self.workload}")
                elif (reason := self._refusal()) is not None and (code := self._after_refusal(reason)) is not None:
                    return code
            if self.workload is not None and self.workload in self.exited:
                code = self.exited[self.workload]
                say(f"workload PID {self.workload} exited with status {code}")
                return code
            code = self._forward()
            if code is not None:
                return code
            timeout = STANDBY_POLL_INTERVAL if self.workload is None else None
            with contextlib.suppress(InterruptedError):
                select.select([wake], [], [], timeout)
            with contextlib.suppress(BlockingIOError):
                while os.read(wake, 512):
                    pass


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # After either marker the rest is the container's argv verbatim (a workload's own "--" included).
    as_runtime = args[:1] == [RUNTIME_ENTRYPOINT_FLAG]
    if as_runtime or args[:1] == ["--"]:
        args = args[1:]
    standby = restore_standby()
    control = control_dir()
    if standby and control is None:
        say("DYN_SNAPSHOT_RESTORE_STANDBY is set but DYN_SNAPSHOT_CONTROL_DIR is not; cannot learn of the restore")
        return 2
    if as_runtime and not standby:  # a restore pod runs nothing of its own: no need for the record
        try:
            args = runtime_command(args)
        except UsageError as exc:
            say(str(exc))
            return 2
    if not standby and not args:
        say("usage: snapshot-init [--] COMMAND [ARG...]")
        return 2
    fallback = None
    if standby and restore_fallback_cold():
        def fallback() -> list[str]:
            return runtime_command(args) if as_runtime else args
    return Init(args, standby, control, fallback).run()


if __name__ == "__main__":
    sys.exit(main())
