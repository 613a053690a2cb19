"""The agent's Prometheus metrics, registered in the registry the agent's start-up hands in (the
process's default one, served on /metrics next to the kube package's informer metrics; a test's own).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.operations = Counter(
            "snapshot_agent_operations_total",
            "Checkpoint and restore operations by outcome (completed, failed)",
            ["operation", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "snapshot_agent_operation_duration_seconds",
            "Wall time of an operation, from start to the verdict written to the API server",
            ["operation"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.in_flight = Gauge("snapshot_agent_operations_in_flight", "Operations running now", ["operation"],
                               registry=registry)
        self.checkpoint_start_latency = Histogram(
            "snapshot_agent_checkpoint_start_latency_seconds",
            "From the agent seeing a source pod's target container Ready to CRIU starting its dump",
            buckets=_SECONDS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "snapshot_agent_stage_duration_seconds",
            "Time of each stage of a completed checkpoint or restore (prefetch-pages runs beside the other restore "
            "stages)",
            ["operation", "stage"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.staging = Counter(
            "snapshot_agent_staging_total",
            "Pre-staging of checkpoints into the node cache by result (staged, refused, postponed, failed)",
            ["result"],
            registry=registry,
        )
        self.restores = Counter(
            "snapshot_agent_restores_by_source_total",
            "Completed restores by where their images were read: node-cache (a cached copy, what a bucket's "
            "restore fetches into, too) or storage (the PVC, copied privately)",
            ["source"],
            registry=registry,
        )
        self.staging_in_progress = Gauge("snapshot_agent_staging_in_progress",
                                         "Checkpoint versions being pre-staged into the node cache now",
                                         registry=registry)
        self._registry = registry

    def watch_cache(self, cache: Any) -> None:
        """Gauges read from the node cache (``artifact/nodecache.NodeCache``) at each scrape."""
        Gauge("snapshot_agent_node_cache_bytes", "Bytes the node-local checkpoint cache holds or is filling",
              registry=self._registry).set_function(lambda: cache.used_bytes)
        Gauge("snapshot_agent_node_cache_budget_bytes", "The node-local checkpoint cache's byte budget",
              registry=self._registry).set_function(lambda: cache.budget_bytes)
        Gauge("snapshot_agent_node_cache_entries", "Checkpoint versions complete in the node-local cache",
              registry=self._registry).set_function(lambda: len(cache.entries()))

    def observe_stages(self, operation: str, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_duration.labels(operation, stage).observe(value)
