"""Getting a worker's process tree into a state that can be checkpointed (stdlib only).

A CUDA checkpoint moves every CUDA process's GPU state into its memory and releases the devices;
CRIU then dumps the tree. A process that holds NVIDIA device mappings without being a CUDA process
(a child forked from a CUDA process, such as torch.compile's compile workers) can do neither: the
agent refuses such a tree, naming the processes. So the worker shuts its helpers down before it
says ready-for-snapshot; ``mark_ready_for_snapshot()`` calls ``stop_gpu_helpers()`` for it.

Workers can also register hooks, run in order:

* ``on_snapshot(fn)``: before ready-for-snapshot is written (free caches, release GPU memory that
  can be read again after a restore, close connections to peers);
* ``on_restore(fn)``: when ``wait_for_outcome()`` sees restore-complete (reload what was released,
  reconnect).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

# Command-line fragments of helper processes known to inherit NVIDIA mappings: torch.compile's
# compile-worker pool (a subprocess and the workers it forks) all carry this in their argv.
KNOWN_HELPERS: tuple[str, ...] = ("torch/_inductor/compile_worker", "torch._inductor.compile_worker")

_snapshot_hooks: list[Callable[[], object]] = []
_restore_hooks: list[Callable[[], object]] = []
_PROC = Path("/proc")


def on_snapshot(fn: Callable[[], object]) -> Callable[[], object]:
    """Register ``fn`` to run before ready-for-snapshot is signalled (usable as a decorator)."""
    _snapshot_hooks.append(fn)
    return fn


def on_restore(fn: Callable[[], object]) -> Callable[[], object]:
    """Register ``fn`` to run when this process learns it was restored (usable as a decorator)."""
    _restore_hooks.append(fn)
    return fn


def run_snapshot_hooks() -> None:
    for fn in list(_snapshot_hooks):
        fn()


def run_restore_hooks() -> None:
    for fn in list(_restore_hooks):
        fn()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    return found


def descendants(pid: int | None = None) -> list[int]:
    """Every process below ``pid`` (default: this process)."""
    todo, seen = _children(os.getpid() if pid is None else pid), []
    while todo:
        child = todo.pop()
        if child not in seen:
            seen.append(child)
            todo.extend(_children(child))
    return sorted(seen)


def _cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def holds_nvidia_device(pid: int) -> bool:
    """True when ``pid`` maps or has open an NVIDIA device file (``/dev/nvidia*``)."""
    try:
        with open(_PROC / str(pid) / "maps", encoding="utf-8", errors="replace") as maps:
            if any(" /dev/nvidia" in line for line in maps):
                return True
    except OSError:
        pass
    try:
        for fd in (_PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd).startswith("/dev/nvidia"):
                    return True
    except OSError:
        pass
    return False


def gpu_descendants() -> list[int]:
    """Processes below this one that hold NVIDIA devices: each must be a CUDA process for the
    checkpoint to succeed (the agent checks that with the driver; this is the stdlib-side view)."""
    return [pid for pid in descendants() if holds_nvidia_device(pid)]


def trim_host_memory() -> bool:
    """Hand freed heap memory back to the kernel (glibc ``malloc_trim``): a checkpoint dumps every
    touched page, free-but-kept ones included. False where the C library has no malloc_trim."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _known_helpers(patterns: Iterable[str]) -> list[int]:
    wanted = tuple(patterns)
    return [pid for pid in descendants() if any(p in _cmdline(pid) for p in wanted)]


def _shutdown_torch_compile_workers() -> None:
    """torch's own shutdown of its compile-worker pools, if torch.compile was used in this process
    (only looked up in sys.modules: this module never imports torch)."""
    module = sys.modules.get("torch._inductor.async_compile")
    shutdown = getattr(module, "shutdown_compile_workers", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # the processes are stopped by signal below anyway
            print(f"dynamo_snapshot: torch shutdown_compile_workers failed: {exc}", file=sys.stderr)


def _gone(pid: int) -> bool:
    try:
        with open(_PROC / str(pid) / "stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_gpu_helpers(
    patterns: Iterable[str] = KNOWN_HELPERS, extra: Iterable[int] = (), timeout: float = 10.0
) -> list[int]:
    """Shut down helper processes that would block a checkpoint; returns the PIDs stopped.

    First torch's own compile-worker shutdown (when torch.compile ran here), then SIGTERM - and after
    ``timeout`` seconds SIGKILL - for every remaining descendant whose command line matches
    ``patterns``, and for the PIDs in ``extra`` (helpers the worker knows of itself). Torch starts a
    new pool when it compiles again, e.g. after a restore."""
    patterns = tuple(patterns)
    found = set(_known_helpers(patterns)) | set(extra)
    _shutdown_torch_compile_workers()
    victims = sorted(set(_known_helpers(patterns)) | set(extra))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(not _gone(pid) for pid in victims) and time.monotonic() < deadline:
        for pid in victims:
            _reap(pid)
        time.sleep(0.02)
    for pid in victims:
        if not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while any(not _gone(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in victims:
        _reap(pid)
    return sorted(found | set(victims))
