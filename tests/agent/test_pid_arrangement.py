"""CRIU restores the workload's PIDs inside the placeholder's PID namespace, where snapshot-init and
the restore tooling also run: the PIDs must not collide, and nothing in the pod needs privilege for
that (real containerd, runc and CRIU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agent import node_harness as harness

pytestmark = pytest.mark.containers


def test_the_pod_cannot_move_its_own_pid_counter(node: harness.Node, pods: harness.Pods) -> None:
    placeholder = pods.placeholder()
    code, _, _ = node.exec(placeholder.container_id, ["/bin/sh", "-c", "echo 5000 > /proc/sys/kernel/ns_last_pid"])
    assert code != 0


def test_restore_succeeds_when_the_next_free_pid_is_the_checkpoints_first(
    node: harness.Node, bundle, pods: harness.Pods, tmp_path: Path
) -> None:
    source = pods.counter(heap_mib=16)
    base = tmp_path / "checkpoints"
    stored = harness.checkpoint(node, bundle, source, base, "pids")
    lowest = min(stored.manifest["workload"]["pids"])

    placeholder = pods.placeholder()
    # Unprivileged, from inside the pod: start processes (one per loop) until the PID the namespace
    # hands out next is exactly the restored workload's. Left alone, the restore tooling would take it.
    counter = "/proc/sys/kernel/ns_last_pid"
    burn = f'while [ "$(cat {counter})" -lt {lowest - 2} ]; do :; done; cat {counter}'
    code, last, err = node.exec(placeholder.container_id, ["/bin/sh", "-c", burn], timeout_s=120)
    assert code == 0, err
    assert int(last) == lowest - 1, "setup: the next PID is not the checkpoint's first"

    result = harness.restore(node, bundle, placeholder, base, "pids")

    assert result.workload_pid == stored.manifest["workload"]["rootPID"]
    harness.wait_for(
        lambda: any(e["event"] == "restored" for e in placeholder.events()), 60, "the restored counter to report"
    )
