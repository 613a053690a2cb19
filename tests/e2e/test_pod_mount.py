"""podMount on a real node: only the workload pods mount the namespace's checkpoint PVC, and the agent
reaches it through their root filesystems (``/proc/<pid>/root/<basePath>``, resolved inside that root)."""

from __future__ import annotations

import time

import pytest

from dynamo_snapshot.agent.artifact import layout, verification
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container.criu import CriuBundle
from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.devcluster.stack import POD_BASE_PATH
from dynamo_snapshot.kube import PODS

pytestmark = pytest.mark.e2e

STORAGE_MODE = "podMount"


def test_checkpoint_and_restore_through_the_pods_own_volume(flow: Flow):
    stack = flow.stack
    run = flow.create_checkpoint(checkpoint_manifest("pod-mounted"))
    source = stack.get("pod", run.source_pod)
    assert source["metadata"]["annotations"][names.ANN_STORAGE_BASE_PATH] == POD_BASE_PATH
    assert {"name": "checkpoint-storage", "mountPath": POD_BASE_PATH} in source["spec"]["containers"][0]["volumeMounts"]
    # The artifact landed on the PVC (a hostPath volume here), written through the source pod's root.
    here = artifact.Compatibility.of_this_node(CriuBundle.locate().version())
    verification.verify(layout.ArtifactLayout(stack.checkpoints, run.checkpoint_id).final_dir, run.checkpoint_id, here)

    started = time.time()
    stack.apply(dgd_manifest("from-pvc", replicas=1, checkpoint_ref="pod-mounted"))
    (restored,) = flow.wait_restored(component_selector("from-pvc"), 1, started)
    assert restored.instance == run.instance and restored.heap_ok


def test_a_wait_that_times_out_says_where_the_stack_got_to(flow: Flow):
    """What CI keeps of a failed run is the error's text: a timed-out wait names the nodes, every pod with
    its phase, and the agent's and the operator's last log lines."""
    stack = flow.stack
    with pytest.raises(TimeoutError) as err:
        stack.watch(PODS, lambda pods: False, "nothing at all", timeout=2)
    text = str(err.value)
    assert text.startswith("timed out after 2 s waiting for nothing at all")
    for part in ("--- nodes ---", f"{stack.node.name} Ready", "--- pods ---", "--- last lines of the agent's log ---",
                 "--- last lines of the operator's log ---"):
        assert part in text
    assert any(line.startswith("from-pvc-") for line in text.splitlines())  # the restored pod, with its phase
