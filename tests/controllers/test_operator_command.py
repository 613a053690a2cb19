"""The operator's command line refuses a missing kubeconfig or configuration by name, exit 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.controllers.support import REPO


def _operator(*args: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("KUBERNETES_")}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    return subprocess.run([sys.executable, "-m", "dynamo_snapshot.controllers", *args, "--metrics-bind-address",
                           "0", "--health-probe-bind-address", "127.0.0.1:0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_operator_without_any_cluster_configuration_says_so_and_exits_2(tmp_path):
    result = _operator(tmp_path=tmp_path)
    assert result.returncode == 2
    assert "no cluster configuration" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--kubeconfig", "--config"])
def test_the_operator_with_a_missing_file_names_it_and_exits_2(tmp_path, flag):
    missing = tmp_path / "absent.yaml"
    result = _operator(flag, str(missing), tmp_path=tmp_path)
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
