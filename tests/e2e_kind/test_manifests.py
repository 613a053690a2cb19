"""The kind e2e's objects are valid against the CRDs (server-side dry run on the local control plane), so
a broken manifest fails here, not twenty minutes into `make e2e` on a machine with Docker; and they run
the placeholder image the script builds."""

from __future__ import annotations

import re

import pytest
import yaml

from .test_kind import E2E, REPO

MANIFESTS = [REPO / "hack" / "kind" / name for name in ("checkpoint.yaml", "restore.yaml")]


@pytest.mark.integration
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_the_api_server_accepts_the_e2e_objects(kubectl, namespace, manifest) -> None:
    out = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(manifest))
    assert "(server dry run)" in out


def test_the_objects_run_the_placeholder_the_script_builds() -> None:
    built = re.search(r'^PLACEHOLDER_IMAGE="dynamo-snapshot-e2e-placeholder:\$TAG"', E2E.read_text(), re.M)
    tag = re.search(r"^TAG=(\S+)$", E2E.read_text(), re.M)
    assert built and tag
    checkpoint, dgd = (yaml.safe_load(m.read_text()) for m in MANIFESTS)
    (main,) = checkpoint["spec"]["job"]["podTemplateSpec"]["spec"]["containers"]
    worker = dgd["spec"]["services"]["CounterWorker"]["extraPodSpec"]["mainContainer"]
    for container in (main, worker):
        assert container["image"] == f"dynamo-snapshot-e2e-placeholder:{tag.group(1)}"
        # No command and no args: the runtime image's own ENTRYPOINT must run under snapshot-init.
        assert "command" not in container and "args" not in container
    assert dgd["spec"]["services"]["CounterWorker"]["checkpoint"]["checkpointRef"] == checkpoint["metadata"]["name"]
