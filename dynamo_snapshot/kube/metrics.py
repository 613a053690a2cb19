"""Prometheus metrics of queues, controllers and reflectors, named like client-go's and controller-runtime's
so existing dashboards read them. Registered once, in prometheus_client's default registry."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "RECONCILE_ERRORS",
    "RECONCILE_TIME",
    "RECONCILE_TOTAL",
    "REFLECTOR_EVENTS",
    "REFLECTOR_LISTS",
    "REFLECTOR_WATCHES",
    "WORKQUEUE_ADDS",
    "WORKQUEUE_DEPTH",
    "WORKQUEUE_QUEUE_DURATION",
    "WORKQUEUE_RETRIES",
    "WORKQUEUE_WORK_DURATION",
]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1000)

WORKQUEUE_DEPTH = Gauge("workqueue_depth", "Current depth of the workqueue (keys ready to be processed).",
                        ["name"])
WORKQUEUE_ADDS = Counter("workqueue_adds_total", "Keys added to the workqueue (after de-duplication).", ["name"])
WORKQUEUE_QUEUE_DURATION = Histogram("workqueue_queue_duration_seconds",
                                     "How long a key waits in the workqueue before a worker takes it.",
                                     ["name"], buckets=_LATENCY_BUCKETS)
WORKQUEUE_WORK_DURATION = Histogram("workqueue_work_duration_seconds",
                                    "How long processing a key takes (get to done).", ["name"],
                                    buckets=_LATENCY_BUCKETS)
WORKQUEUE_RETRIES = Counter("workqueue_retries_total", "Rate-limited re-adds (retries) of keys.", ["name"])

RECONCILE_TOTAL = Counter("controller_reconcile_total", "Reconciliations by result.", ["controller", "result"])
RECONCILE_ERRORS = Counter("controller_reconcile_errors_total", "Reconciliations that raised.", ["controller"])
RECONCILE_TIME = Histogram("controller_reconcile_time_seconds", "Duration of one reconciliation.",
                           ["controller"], buckets=_LATENCY_BUCKETS)

REFLECTOR_LISTS = Counter("reflector_lists_total", "LISTs made by reflectors, by why.", ["name", "reason"])
REFLECTOR_WATCHES = Counter("reflector_watches_total", "WATCH streams opened by reflectors.", ["name"])
REFLECTOR_EVENTS = Counter("reflector_watch_events_total", "Watch events received, bookmarks included.",
                           ["name", "type"])
