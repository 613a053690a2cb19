"""A real helm binary for the chart tests, and helpers to render the charts into objects.

The binary comes from hack/build-helm.sh (a no-op when cached; CI runs it first). HELM_BIN overrides it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT_CHART = REPO / "helm" / "snapshot"
OPERATOR_CHART = REPO / "helm" / "operator"


class HelmError(AssertionError):
    pass


class Helm:
    def __init__(self, binary: str):
        self.binary = binary

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise HelmError(f"helm {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    @staticmethod
    def set_args(values: Mapping[str, Any]) -> list[str]:
        """`--set key=value` as a user types it (helm parses true/false/numbers itself)."""
        return [f"--set={key}={value}" for key, value in values.items()]

    def render_text(self, chart: Path, *, namespace: str = "default", release: str = "snap",
                    values: Mapping[str, Any] = {}, api_versions: Iterable[str] = ()) -> str:
        """`helm template`; `api_versions` are what the cluster would serve beyond helm's defaults."""
        return self.run("template", release, str(chart), f"--namespace={namespace}", *self.set_args(values),
                        *(f"--api-versions={v}" for v in api_versions)).stdout

    def template(self, chart: Path, **kwargs) -> list[dict]:
        return [doc for doc in yaml.safe_load_all(self.render_text(chart, **kwargs)) if doc]

    def template_error(self, chart: Path, *, values: Mapping[str, Any]) -> str:
        result = self.run("template", "snap", str(chart), *self.set_args(values), check=False)
        assert result.returncode != 0, f"helm template unexpectedly succeeded with {dict(values)}"
        return result.stderr


@pytest.fixture(scope="session")
def helm() -> Helm:
    if os.environ.get("HELM_BIN"):
        return Helm(os.environ["HELM_BIN"])
    result = subprocess.run([str(REPO / "hack" / "build-helm.sh")], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["hack/build-helm.sh failed"])[-1]
        pytest.skip(f"no helm binary (hack/build-helm.sh: {reason})")
    return Helm(result.stdout.strip().splitlines()[-1])


def only(objects: Iterable[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def kinds(objects: Iterable[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)
