"""`make e2e` (hack/kind/e2e.sh): checkpoint and restore a CPU worker in a kind cluster through the real
images and charts, all built offline. It needs a Docker engine (hack/kind/docker-engine.sh start makes
one); without one the test skips, and the script itself says so and exits 0 without building anything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
E2E = REPO / "hack" / "kind" / "e2e.sh"
NO_DOCKER = "no Docker engine: kind e2e needs one"


def docker_engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.e2e
@pytest.mark.timeout(3600)
def test_checkpoint_and_restore_in_kind() -> None:
    if not docker_engine():
        pytest.skip(NO_DOCKER)
    # This interpreter's venv, wherever the checkout's own .venv is (or is not).
    # A cluster of its own, so that a `make e2e` someone runs beside the suite is not deleted under it.
    cluster = f"dynamo-snapshot-e2e-test-{os.getpid()}"
    env = {**os.environ, "E2E_PYTHON": sys.executable, "KEEP_CLUSTER": "0", "KIND_CLUSTER": cluster}
    result = subprocess.run([str(E2E)], capture_output=True, text=True, env=env, timeout=3500)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "] PASS: DynamoCheckpoint" in result.stderr
    assert cluster not in subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"],
                                                       capture_output=True, text=True).stdout


def test_without_a_docker_engine_the_script_says_so_and_builds_nothing(tmp_path: Path) -> None:
    """What `make e2e` does on a machine like CI's: one line, exit 0, and no kind or helm build."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("go", "kind", "helm"):
        stand_in = tools / tool
        stand_in.write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\nexit 1\n")
        stand_in.chmod(0o755)
    env = {**os.environ, "DOCKER": "false", "PATH": f"{tools}:{os.environ['PATH']}",
           "DYNAMO_SNAPSHOT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([str(E2E)], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == NO_DOCKER + "\n"
    assert not (tmp_path / "called").exists(), (tmp_path / "called").read_text()
    assert not (tmp_path / "cache").exists()
