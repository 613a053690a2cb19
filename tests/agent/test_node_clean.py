"""``python -m dynamo_snapshot.devcluster.node clean DIR`` removes what a killed node left below DIR, also
when DIR is relative (as the docs write it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_snapshot.devcluster import node

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


@needs_root
def test_clean_with_a_relative_path_unmounts_what_the_node_left(tmp_path: Path):
    node_dir = tmp_path / "cluster" / "node"
    leftover = node_dir / "containerd" / "state" / "rootfs"
    leftover.mkdir(parents=True)
    (node_dir / "node.json").write_text('{"bridge": "dsnclean0", "subnet": "10.253.253.0/24"}')
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(leftover)], check=True)
    try:
        assert mounted(leftover)
        result = subprocess.run([sys.executable, "-m", "dynamo_snapshot.devcluster.node", "clean", "cluster"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(Path(node.__file__).parents[2])})
        assert result.returncode == 0, result.stderr
        assert f"cleaned up the node in {node_dir}" in result.stdout
        assert not mounted(leftover)
    finally:
        subprocess.run(["umount", "-l", str(leftover)], capture_output=True)


def test_stop_stops_the_recorded_processes_by_pid_and_nothing_else_that_names_the_path(tmp_path: Path):
    from dynamo_snapshot.devcluster import pids

    root = tmp_path / "cluster"
    argv = [sys.executable, "-c", "import time; time.sleep(600)", str(root)]  # both name the path
    ours = subprocess.Popen(argv, start_new_session=True)
    bystander = subprocess.Popen(argv, start_new_session=True)
    try:
        pids.record(root, "sleeper", ours.pid)
        result = subprocess.run([sys.executable, "-m", "dynamo_snapshot.devcluster.pids", "stop", "cluster"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "stopped sleeper" in result.stdout, result.stderr
        assert ours.wait(timeout=10) == -15
        assert bystander.poll() is None
        assert not list((root / "pids").iterdir())
        # a second stop finds nothing recorded (a PID file never outlives its stop)
        again = subprocess.run([sys.executable, "-m", "dynamo_snapshot.devcluster.pids", "stop", "cluster"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and again.stdout == ""
    finally:
        for process in (ours, bystander):
            process.kill()
            process.wait()
