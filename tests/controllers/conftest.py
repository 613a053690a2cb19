from __future__ import annotations

import pytest

from tests.controllers.support import Cluster, OperatorProcess


@pytest.fixture
def cluster(kubectl, namespace) -> Cluster:
    return Cluster(kubectl, namespace)


@pytest.fixture
def start_operator(kubeconfig, namespace, tmp_path):
    """Start `dynamo-snapshot operator` for this test's namespace with a given configuration."""
    started: list[OperatorProcess] = []

    def start(config: dict) -> OperatorProcess:
        operator = OperatorProcess(kubeconfig, namespace, tmp_path, config).start()
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
    if started:
        print(f"--- operator log ({started[-1].log_path}) ---\n{started[-1].log_tail(60)}")
