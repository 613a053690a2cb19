"""Pre-staging on a real node, all real: the operator's staging controller names the node where a Ready
checkpoint's restoring pods can run (``status.staging``), the agent fetches it into its node cache ahead of
them and says so on its Lease ``snapshot-staged-<node>``, the pod that comes later restores from the cached
copy, and a deleted checkpoint leaves the cache and the report.

agentMount storage, the agent's node cache on (``NODE_CACHE_GIB``), pre-staging on (``STAGING_MAX_NODES``)."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_snapshot.api import names
from dynamo_snapshot.devcluster.scenarios import Flow, checkpoint_manifest, component_selector, dgd_manifest
from dynamo_snapshot.devcluster.stack import SnapshotStack
from dynamo_snapshot.kube import DYNAMO_CHECKPOINTS, LEASES

pytestmark = pytest.mark.e2e

STORAGE_MODE = "agentMount"
NODE_CACHE_GIB = 1  # the 64 MiB counter's checkpoint is a small part of it
STAGING_MAX_NODES = 1

CHECKPOINT, GRAPH = "prestaged", "from-cache"


def staged_report(lease: dict) -> list[dict[str, str]]:
    """What the agent's staging Lease says its node cache holds."""
    return json.loads((lease["metadata"].get("annotations") or {}).get(names.ANN_STAGED, "null") or "null")


def agent_metrics(stack: SnapshotStack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's /metrics samples, by name and labels."""
    with urllib.request.urlopen(stack.agent_metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def cached_versions(stack: SnapshotStack, checkpoint_id: str) -> list[str]:
    entry = stack.node_cache / checkpoint_id
    return sorted(p.name for p in entry.iterdir()) if entry.is_dir() else []


@pytest.fixture(scope="module")
def staged(stack: SnapshotStack) -> dict:
    """A Ready checkpoint, and a graph that restores from it (``checkpointRef``) at 0 replicas: nothing
    restores yet, so what the node cache holds when the pod comes was staged ahead of it."""
    flow = Flow(stack)
    run = flow.create_checkpoint(checkpoint_manifest(CHECKPOINT))
    assert not (stack.get("dckpt", CHECKPOINT).get("status") or {}).get("staging")  # nothing restores from it
    stack.apply(dgd_manifest(GRAPH, replicas=0, checkpoint_ref=CHECKPOINT))
    node = stack.node.name
    ckpt = stack.wait_object(
        DYNAMO_CHECKPOINTS, CHECKPOINT, lambda c: node in ((c.get("status") or {}).get("staging") or {}).get(
            "staged", []), f"DynamoCheckpoint {CHECKPOINT} to be staged on {node}", timeout=120)
    return {"run": run, "checkpoint": ckpt}


def test_a_checkpoint_a_graph_restores_from_is_staged_on_the_node_where_its_pods_can_run(flow: Flow, staged):
    stack, run, ckpt = flow.stack, staged["run"], staged["checkpoint"]
    node = stack.node.name
    assert ckpt["status"]["staging"]["nodes"] == [node]
    assert ckpt["status"]["staging"]["staged"] == [node]
    assert ckpt["status"]["staging"]["artifactVersion"] == names.DEFAULT_ARTIFACT_VERSION

    lease = stack.get("lease", names.STAGED_LEASE_PREFIX + node)
    assert lease["metadata"]["labels"][names.LABEL_STAGED_NODE] == node
    assert staged_report(lease) == [{"checkpointID": run.checkpoint_id, "version": names.DEFAULT_ARTIFACT_VERSION}]
    assert cached_versions(stack, run.checkpoint_id) == [names.DEFAULT_ARTIFACT_VERSION]
    assert [r["checkpoint_id"] for r in stack.agent_events("pre-staged into the node cache")] == [run.checkpoint_id]

    metrics = agent_metrics(stack)
    assert metrics[("snapshot_agent_staging_total", (("result", "staged"),))] == 1
    assert metrics[("snapshot_agent_staging_in_progress", ())] == 0
    assert metrics[("snapshot_agent_node_cache_entries", ())] == 1
    assert 0 < metrics[("snapshot_agent_node_cache_bytes", ())] <= metrics[
        ("snapshot_agent_node_cache_budget_bytes", ())] == NODE_CACHE_GIB << 30


def test_the_pod_that_comes_later_restores_the_checkpointed_worker_from_the_node_cache(flow: Flow, staged):
    stack, run = flow.stack, staged["run"]
    started = flow.scale(GRAPH, 1)
    (restored,) = flow.wait_restored(component_selector(GRAPH), 1, started)
    assert restored.instance == run.instance and restored.heap_ok  # the checkpointed process, whole

    # The restore read the staged copy: a cache hit, and so no page check in memory (verified when cached).
    hits = stack.agent_events("restoring from the node cache")
    assert [(r["checkpoint_id"], r["version"]) for r in hits] == [(run.checkpoint_id, names.DEFAULT_ARTIFACT_VERSION)]
    assert hits[0]["path"] == str(stack.node_cache / run.checkpoint_id / names.DEFAULT_ARTIFACT_VERSION)
    (done,) = [r for r in stack.agent_events("restored") if r.get("container_id") == restored.container_id]
    assert done["verified_bytes"] == 0 and done["verify_memory_seconds"] == 0 and done["from_cache"] is True
    metrics = agent_metrics(stack)
    assert metrics[("snapshot_agent_staging_total", (("result", "staged"),))] == 1  # not fetched again
    assert metrics[("snapshot_agent_restores_by_source_total", (("source", "node-cache"),))] == 1


def test_a_deleted_checkpoint_leaves_the_node_cache_and_the_report(flow: Flow, staged):
    stack, run = flow.stack, staged["run"]
    lease = names.STAGED_LEASE_PREFIX + stack.node.name
    stack.kubectl("delete", "dckpt", CHECKPOINT, "-n", stack.namespace, "--wait=true")
    stack.wait_object(LEASES, lease, lambda obj: staged_report(obj) == [],
                      f"the staging Lease {lease} to report an empty node cache", timeout=60)
    assert cached_versions(stack, run.checkpoint_id) == []
    assert [r["checkpoint_id"] for r in stack.agent_events("node cache: checkpoint dropped")] == [run.checkpoint_id]
    assert agent_metrics(stack)[("snapshot_agent_node_cache_entries", ())] == 0
    # the restored worker keeps running: the cache held a copy, not what it runs from
    assert flow.pods(component_selector(GRAPH))[0]["status"]["phase"] == "Running"
