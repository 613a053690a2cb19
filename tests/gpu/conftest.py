"""Real-GPU tests: a PyTorch worker CUDA- and CRIU-checkpointed and restored through the project's
pipeline (``dynamo_snapshot.agent.tree``). Every test is marked ``@pytest.mark.gpu`` and skips, with
one reason, where there is no NVIDIA GPU with the CUDA checkpoint API.

On a machine whose Python lacks the project's test dependencies (the device machines), run them
without the repository's root conftest:

    python3 -m pytest --noconftest -p tests.gpu.conftest -m gpu tests/gpu
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gpu.worker_client import Worker
from tests.keys import ensure_session_keys

ensure_session_keys()  # the pipeline signs and verifies checkpoints with the session's key

REASON = "no NVIDIA GPU / CUDA checkpoint API"
REPO = Path(__file__).resolve().parents[2]


def _gpu_missing() -> bool:
    if not Path("/dev/nvidiactl").exists():
        return True
    try:
        from dynamo_snapshot.agent.cuda.driver import CudaUnavailable, load_driver

        load_driver()
    except CudaUnavailable:
        return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU with the CUDA checkpoint API")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if "gpu" in item.keywords]
    if marked and _gpu_missing():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="session")
def bundle():
    from dynamo_snapshot.agent.container import criu

    if os.geteuid() != 0:
        pytest.skip("needs root (CRIU)")
    try:
        return criu.CriuBundle.locate()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def subreaper() -> None:
    """Restored workers are re-parented to this process when CRIU exits, so tests can reap them."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "weights.safetensors"
    gib = os.environ.get("DYN_SNAPSHOT_TEST_WEIGHTS_GIB", "1")
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu" / "weights.py"), "--out", str(path), "--gib", gib],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="module")
def worker(weights_file: Path, tmp_path_factory: pytest.TempPathFactory, subreaper: None) -> Iterator[Worker]:
    started = Worker.start(weights_file, tmp_path_factory.mktemp("worker"))
    yield started
    started.stop()
