"""A container is the pod's by the container runtime's word, not by pod status (which others can patch):
real containerd; a container refused as not the pod's placeholder is never killed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact.storage import StorageMode, StorageResolver
from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.errors import RestoreError
from dynamo_snapshot.agent.service.nodeops import CriuNode
from dynamo_snapshot.agent.service.podwork import PodRef, RestoreWork
from tests.agent import node_harness as harness

pytestmark = pytest.mark.containers


def _node(node: harness.Node, tmp_path: Path, bundle: criu.CriuBundle) -> CriuNode:
    storage = StorageResolver(StorageMode.AGENT_MOUNT, str(tmp_path), node.cri)
    return CriuNode(node.cri, bundle, storage, criu.CriuSettings())


def _work(workload: harness.Workload, pod: PodRef) -> RestoreWork:
    return RestoreWork(pod=pod, container="main", container_id=workload.container_id, checkpoint_id="c1",
                       artifact_version="1", base_path=None)


def _pod_of(node: harness.Node, workload: harness.Workload) -> PodRef:
    meta = node.call(node.cri.sandbox_status, workload.pod.sandbox_id).status.metadata
    return PodRef(meta.namespace, meta.name, meta.uid)


def test_a_restore_naming_another_pods_container_is_refused_and_the_container_not_killed(
    node: harness.Node, pods: harness.Pods, bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    victim = pods.placeholder()
    agent = _node(node, tmp_path, bundle)
    attacker = PodRef("attacker-ns", "attacker", "00000000-0000-0000-0000-000000000000")
    with pytest.raises(RestoreError, match=r"belongs to pod default/placeholder .* not attacker-ns/attacker"):
        node.call(agent.restore, _work(victim, attacker))
    node.call(agent.kill_container, victim.container_id)
    assert node.info(victim.container_id).running


def test_a_labelled_pod_that_is_not_a_placeholder_is_refused_and_left_running(
    node: harness.Node, pods: harness.Pods, bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    worker = pods.counter(heap_mib=8)
    agent = _node(node, tmp_path, bundle)
    with pytest.raises(RestoreError, match="is not a placeholder in standby"):
        node.call(agent.restore, _work(worker, _pod_of(node, worker)))
    node.call(agent.kill_container, worker.container_id)
    assert node.info(worker.container_id).running


def test_the_pods_own_placeholder_passes_the_ownership_check(
    node: harness.Node, pods: harness.Pods, bundle: criu.CriuBundle, tmp_path: Path
) -> None:
    placeholder = pods.placeholder()
    agent = _node(node, tmp_path, bundle)
    info = node.info(placeholder.container_id)
    node.call(agent._check_owned, _work(placeholder, _pod_of(node, placeholder)), info, True)
