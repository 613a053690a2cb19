"""A checkpoint that fails or whose pipeline is killed leaves no promoted directory and no frozen or
stopped workload (real containerd, runc and CRIU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dynamo_snapshot.agent.artifact import layout as artifact_layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import verification
from dynamo_snapshot.agent.cuda.step import NoCuda
from dynamo_snapshot.agent.errors import CriuFailed
from dynamo_snapshot.agent.host import procfs
from dynamo_snapshot.agent.host.cgroups import Freezer
from dynamo_snapshot.agent.pipeline import checkpoint as ckpt
from dynamo_snapshot.agent.pipeline.checkpoint import Settled, Stage
from dynamo_snapshot.agent.pipeline.containers import ContainerTarget
from tests.agent import node_harness as harness

pytestmark = pytest.mark.containers

DRIVER = Path(__file__).with_name("checkpoint_driver.py")
CHECKPOINT_ID = "doomed"
# Stages at which the workload is already in the agent's hands (the guard is armed and kills it).
GUARDED = [s for s in Stage if s not in (Stage.RESOLVE, Stage.RELEASE)]


def _stopped_or_frozen(freezer: Freezer) -> list[str]:
    """Processes of the container that are stopped, traced or frozen."""
    found = []
    for pid in freezer.pids():
        try:
            state = procfs.status_field(pid, "State")
        except (OSError, KeyError):
            continue
        if state[0] in "Tt" or (state[0] == "D" and freezer.frozen()):
            found.append(f"{pid} {procfs.comm(pid)} {state}")
    return found


def _guards_running(freezer: Freezer) -> bool:
    needle = str(freezer.path).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"dynamo_snapshot.agent.pipeline.guard" in cmdline and needle in cmdline:
                return True
    return False


def _kill_pipeline_at(node: harness.Node, workload: harness.Workload, base: Path, stage: Stage,
                      config: Path | None = None) -> None:
    driver = subprocess.Popen(
        [sys.executable, str(DRIVER), node.socket, workload.container_id, str(base), CHECKPOINT_ID, stage.value,
         *([str(config)] if config else [])],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    try:
        line = driver.stdout.readline().strip() if driver.stdout else ""
        assert line == f"at {stage.value}", f"the pipeline did not reach {stage.value}: {line!r}"
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.value)
def test_killing_the_pipeline_leaves_no_promoted_checkpoint_and_no_frozen_workload(
    node: harness.Node, pods: harness.Pods, tmp_path: Path, stage: Stage, request: pytest.FixtureRequest
) -> None:
    config = None
    if stage is Stage.UPLOAD:  # only with object storage: a real MinIO
        server, bucket = request.getfixturevalue("minio_server"), request.getfixturevalue("bucket")
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump({"storage": server.agent_storage(bucket, "p", tmp_path / "s3-keys"),
                                          "cache": {"dir": str(tmp_path / "cache"), "budgetGiB": 1}}))
    workload = pods.counter(heap_mib=16)
    freezer = Freezer.of_process(node.info(workload.container_id).pid)
    base = tmp_path / "checkpoints"
    layout = artifact_layout.ArtifactLayout(base, CHECKPOINT_ID)

    _kill_pipeline_at(node, workload, base, stage, config)
    harness.wait_for(lambda: not _guards_running(freezer), 30, "the checkpoint guard to finish")

    if stage is Stage.RELEASE:  # killed after the promotion: the checkpoint is whole
        verification.verify(layout.final_dir, CHECKPOINT_ID, artifact.Compatibility.of_this_node("4.2.1"))
    else:
        assert not layout.final_dir.exists(), f"a checkpoint was promoted although the pipeline died at {stage}"
    assert not layout.staging_root.exists() or not any(layout.staging_root.iterdir())
    assert not (freezer.path.exists() and freezer.frozen()), "the workload's cgroup was left frozen"
    assert _stopped_or_frozen(freezer) == []
    if stage is Stage.RELEASE:
        # Killed after the confirmation: the verdict may be written, so the guard only thawed; the workload
        # runs on for the agent to settle when it is back (test_a_source_left_after_its_verdict_...).
        assert node.info(workload.container_id).state == "CONTAINER_RUNNING"
    elif stage in GUARDED:
        # The workload may hold half-done CUDA or CRIU state: it is killed, and its init exits with it.
        harness.wait_for(
            lambda: node.info(workload.container_id).state == "CONTAINER_EXITED",
            30,
            "the killed workload's container to exit",
        )
        assert node.info(workload.container_id).exit_code == 128 + signal.SIGKILL
    else:
        assert node.info(workload.container_id).state == "CONTAINER_RUNNING"


def test_criu_failure_reports_the_log_tail_and_kills_the_workload(
    node: harness.Node, bundle, pods: harness.Pods, tmp_path: Path
) -> None:
    workload = pods.counter(heap_mib=16, COUNTER_HOLD_IO_URING="1")  # CRIU cannot dump io_uring
    base = tmp_path / "checkpoints"
    with pytest.raises(CriuFailed) as failure:
        harness.checkpoint(node, bundle, workload, base, CHECKPOINT_ID)
    assert failure.value.action == "dump"
    assert "Dumping FAILED" in failure.value.log_tail
    kept = Path(failure.value.log_path)
    assert kept.is_file() and kept.parent.parent == base / CHECKPOINT_ID / "failed"
    assert str(kept) in str(failure.value)
    layout = artifact_layout.ArtifactLayout(base, CHECKPOINT_ID)
    assert not layout.final_dir.exists()
    assert not any(layout.staging_root.iterdir())
    harness.wait_for(
        lambda: node.info(workload.container_id).state == "CONTAINER_EXITED", 30, "the workload to be killed"
    )


def test_a_source_left_after_its_verdict_is_released_by_the_next_agent(
    node: harness.Node, pods: harness.Pods, tmp_path: Path
) -> None:
    workload = pods.counter(heap_mib=16)
    base = tmp_path / "checkpoints"
    _kill_pipeline_at(node, workload, base, Stage.RELEASE)
    freezer = Freezer.of_process(node.info(workload.container_id).pid)
    harness.wait_for(lambda: not _guards_running(freezer), 30, "the checkpoint guard to finish")
    target = ContainerTarget(node.cri, workload.container_id)
    settled = node.call(ckpt.settle_source, target, NoCuda(), (CHECKPOINT_ID, "1"))
    assert settled is Settled.RELEASED
    harness.wait_for(lambda: node.info(workload.container_id).state == "CONTAINER_EXITED", 30,
                     "the released workload to exit on snapshot-complete")
    assert node.info(workload.container_id).exit_code == 0
    assert [e for e in workload.events() if e.get("event") == "snapshot-complete"]


def test_a_source_its_dead_agent_had_frozen_is_killed_and_an_untouched_one_left_running(
    node: harness.Node, pods: harness.Pods
) -> None:
    """No guard survives an agent pod's death (its processes die with it): the next agent finds the
    workload as the dump left it. Frozen (or stopped): killed; untouched: left for a fresh attempt."""
    frozen, untouched = pods.counter(heap_mib=16), pods.counter(heap_mib=16)
    Freezer.of_process(node.info(frozen.container_id).pid).freeze()
    settle = [node.call(ckpt.settle_source, ContainerTarget(node.cri, w.container_id), NoCuda(), None)
              for w in (frozen, untouched)]
    assert settle == [Settled.KILLED, Settled.UNTOUCHED]
    harness.wait_for(lambda: node.info(frozen.container_id).state == "CONTAINER_EXITED", 30,
                     "the frozen workload's container to exit")
    assert node.info(untouched.container_id).state == "CONTAINER_RUNNING"
    assert not Freezer.of_process(node.info(untouched.container_id).pid).frozen()
