"""Helper-process shutdown and snapshot/restore hooks of the worker-side module (stdlib only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamo_snapshot import workload
from dynamo_snapshot.workload import helpers

# The command line torch.compile's compile-worker pool runs with (the path is what matters).
POOL_ARGV = [sys.executable, "-c", "import time; time.sleep(120)", "/x/torch/_inductor/compile_worker/__main__.py"]


def test_known_helpers_are_stopped_and_reaped_others_are_left() -> None:
    pool = subprocess.Popen(POOL_ARGV)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.monotonic() + 10
        while pool.pid not in helpers.descendants() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert workload.stop_gpu_helpers(timeout=5) == [pool.pid]
        assert not Path(f"/proc/{pool.pid}").exists() or pool.poll() is not None
        assert other.poll() is None
    finally:
        for proc in (pool, other):
            proc.kill()
            proc.wait()


def test_extra_pids_are_stopped_too() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert workload.stop_gpu_helpers(patterns=(), extra=[child.pid], timeout=5) == [child.pid]
        with pytest.raises(ChildProcessError):  # stopped and reaped: no zombie left for the image
            os.waitpid(child.pid, os.WNOHANG)
    finally:
        child.kill()  # Popen notices the PID was reaped (ECHILD) and signals nothing
        child.wait()


def test_processes_without_nvidia_devices_are_not_gpu_descendants() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        assert not helpers.holds_nvidia_device(child.pid)
        assert child.pid not in workload.gpu_descendants()
    finally:
        child.kill()
        child.wait()


def test_snapshot_hooks_run_before_ready_and_restore_hooks_on_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "_snapshot_hooks", [])
    monkeypatch.setattr(helpers, "_restore_hooks", [])
    seen: list[str] = []
    workload.on_snapshot(lambda: seen.append(f"snapshot, ready={(tmp_path / 'ready-for-snapshot').exists()}"))
    workload.on_restore(lambda: seen.append("restore"))
    workload.mark_ready_for_snapshot(tmp_path)
    assert seen == ["snapshot, ready=False"]
    (tmp_path / "restore-complete").write_text("{}")
    assert workload.wait_for_outcome(timeout=1, directory=tmp_path) is workload.Outcome.RESTORE_COMPLETE
    assert seen == ["snapshot, ready=False", "restore"]
