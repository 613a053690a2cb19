"""The operator process itself: probes and metrics served, leader election, a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml

from tests.controllers.support import REPO, eventually

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def test_probes_metrics_leader_lease_and_clean_stop(kubeconfig, kubectl, namespace, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"checkpoint": {"enabled": True}}))
    health, metrics = _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "dynamo_snapshot.controllers", f"--kubeconfig={kubeconfig}", f"--config={config}",
         f"--namespace={namespace}", "--leader-elect", f"--leader-election-namespace={namespace}",
         f"--health-probe-bind-address=127.0.0.1:{health}", f"--metrics-bind-address=127.0.0.1:{metrics}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DYN_SNAPSHOT_LOG_FORMAT": "json"})
    try:
        eventually(lambda: _get(f"http://127.0.0.1:{health}/readyz")[0] == 200, what="/readyz")
        assert _get(f"http://127.0.0.1:{health}/healthz")[0] == 200
        status, body = _get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and "workqueue" in body
        lease = yaml.safe_load(kubectl("get", "lease", "dynamo-snapshot-operator", "-n", namespace, "-o", "yaml"))
        assert lease["spec"]["holderIdentity"]
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    released = yaml.safe_load(kubectl("get", "lease", "dynamo-snapshot-operator", "-n", namespace, "-o", "yaml"))
    assert not released["spec"].get("holderIdentity")


def test_bad_configuration_is_refused_with_the_field(kubeconfig, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("checkpoint:\n  storage:\n    accessMode: hostMount\n")
    result = subprocess.run(
        [sys.executable, "-m", "dynamo_snapshot.controllers", f"--kubeconfig={kubeconfig}", f"--config={config}",
         "--health-probe-bind-address=0", "--metrics-bind-address=0"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "checkpoint.storage.accessMode: invalid enum value 'hostMount' (expected one of: agentMount, podMount)" \
        in result.stderr
