"""The worker side of /snapshot-control (SPEC section 8)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dynamo_snapshot import workload


def test_disabled_without_a_control_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not workload.enabled({})
    assert workload.control_dir({"DYN_SNAPSHOT_CONTROL_DIR": "  "}) is None
    assert workload.enabled({"DYN_SNAPSHOT_CONTROL_DIR": "/snapshot-control"})
    monkeypatch.delenv("DYN_SNAPSHOT_CONTROL_DIR", raising=False)
    with pytest.raises(RuntimeError, match="DYN_SNAPSHOT_CONTROL_DIR is not set"):
        workload.mark_ready_for_snapshot()


@pytest.mark.parametrize(("value", "standby"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_restore_standby_flag(value: str, standby: bool) -> None:
    assert workload.restore_standby({"DYN_SNAPSHOT_RESTORE_STANDBY": value}) is standby


def test_ready_for_snapshot_is_written_atomically(tmp_path: Path) -> None:
    path = workload.mark_ready_for_snapshot(tmp_path)
    assert path == tmp_path / "ready-for-snapshot"
    assert [p.name for p in tmp_path.iterdir()] == ["ready-for-snapshot"]  # no temporary left behind
    assert json.loads(path.read_text())["readyAt"] > 0
    assert "rereadAfterRestore" not in json.loads(path.read_text())


def test_files_to_reread_after_a_restore_are_declared_with_ready(tmp_path: Path) -> None:
    path = workload.mark_ready_for_snapshot(tmp_path, reread_after_restore=["/models/llama", Path("/tok.json")])
    assert json.loads(path.read_text())["rereadAfterRestore"] == ["/models/llama", "/tok.json"]


def test_a_relative_path_to_reread_is_refused_before_anything_is_signalled(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reread_after_restore: 'models/llama' is not an absolute path"):
        workload.mark_ready_for_snapshot(tmp_path, reread_after_restore=["models/llama"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("written", "outcome"),
    [
        ("snapshot-complete", workload.Outcome.SNAPSHOT_COMPLETE),
        ("restore-complete", workload.Outcome.RESTORE_COMPLETE),
    ],
)
def test_wait_returns_what_the_agent_wrote(tmp_path: Path, written: str, outcome: workload.Outcome) -> None:
    timer = threading.Timer(0.2, lambda: workload.write_signal(written, "{}", tmp_path))
    timer.start()
    try:
        assert workload.wait_for_outcome(timeout=30, directory=tmp_path) is outcome
    finally:
        timer.cancel()


def test_wait_gives_up_after_the_timeout(tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match=str(tmp_path)):
        workload.wait_for_outcome(timeout=0.2, directory=tmp_path)


def test_importing_the_workload_helper_stays_light() -> None:
    # Inference workers import it: it must not pull in the agent's dependencies.
    code = (
        "import sys; import dynamo_snapshot.workload; "
        "heavy = {'grpc', 'anyio', 'structlog', 'kubernetes_asyncio', 'msgspec', 'yaml'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_worker_and_the_agent_agree_on_the_contract(tmp_path: Path) -> None:
    """dynamo_snapshot.workload cannot import the package's names (stdlib only): its copies must match."""
    from dynamo_snapshot.api import names
    from dynamo_snapshot.workload import control

    assert (control.CONTROL_DIR_ENV, control.RESTORE_STANDBY_ENV) == (names.ENV_CONTROL_DIR, names.ENV_RESTORE_STANDBY)
    assert (control.READY_FOR_SNAPSHOT, control.SNAPSHOT_COMPLETE, control.RESTORE_COMPLETE) == (
        names.FILE_READY_FOR_SNAPSHOT, names.FILE_SNAPSHOT_COMPLETE, names.FILE_RESTORE_COMPLETE)
    assert control.MAX_REREAD_PATHS == names.MAX_REREAD_PATHS
    assert (control.RESTORE_FAILED, control.RESTORE_FALLBACK_ENV, control.RESTORE_FALLBACK_COLD) == (
        names.FILE_RESTORE_FAILED, names.ENV_RESTORE_FALLBACK, names.RESTORE_FALLBACK_COLD)
    body = json.loads(workload.mark_ready_for_snapshot(tmp_path, reread_after_restore=["/m"]).read_text())
    assert body[names.FIELD_REREAD_AFTER_RESTORE] == ["/m"]
