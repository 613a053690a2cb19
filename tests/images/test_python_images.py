"""The agent and operator images built without Docker (hack/images/python_images.py) are laid out as
their Dockerfiles say: the same entry point, command, user, environment, role label and paths."""

from __future__ import annotations

import shlex

import pytest
import yaml

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.devcluster import images, service_route

from . import dockerfile
from .support import DOCKERFILES, REPO

BUILDER = images.python_builder()
CONFIGS = {"agent": BUILDER.AGENT_CONFIG, "operator": BUILDER.OPERATOR_CONFIG}


def env_of(stage: dockerfile.Stage) -> dict[str, str]:
    found = {}
    for instruction in stage.all("ENV"):
        found.update(word.split("=", 1) for word in shlex.split(instruction.value))
    return found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_local_build_runs_what_the_dockerfile_runs(name: str) -> None:
    final = dockerfile.parse(DOCKERFILES[name]).final
    config = CONFIGS[name]
    assert config["entrypoint"] == final.last("ENTRYPOINT").exec_form()
    cmd = final.last("CMD")
    assert config["cmd"] == (cmd.exec_form() if cmd else None)
    user = final.last("USER")
    assert config["user"] == (user.value if user else None)
    expected_env = env_of(final)
    expected_env["PATH"] = expected_env["PATH"].replace("$PATH", BUILDER.b.DEFAULT_PATH)
    assert config["env"] == expected_env
    assert config["labels"]["com.nvidia.dynamo.snapshot.role"] == name


def test_the_local_build_puts_the_venv_and_criu_where_the_dockerfile_does() -> None:
    text = dockerfile.parse(DOCKERFILES["agent"]).final.text()
    assert f"COPY --from=python /{BUILDER.VENV} /{BUILDER.VENV}" in text
    assert f"COPY --from=criu /criu /{BUILDER.CRIU_DIR}" in text
    assert f"/{BUILDER.CRIU_DIR}" == str(criu.IMAGE_BUNDLE)
    assert "images/criu/criu.sh /usr/local/bin/criu" in text


def test_the_local_images_carry_the_names_the_charts_default_to() -> None:
    for chart, image in (("snapshot", BUILDER.AGENT_IMAGE), ("operator", BUILDER.OPERATOR_IMAGE)):
        values = yaml.safe_load((REPO / "helm" / chart / "values.yaml").read_text())
        repository = (values.get("daemonset", values))["image"]["repository"]
        assert repository == image
        assert yaml.safe_load((REPO / "helm" / chart / "Chart.yaml").read_text())["appVersion"] == BUILDER.app_version()


def test_the_pods_route_to_the_api_server_is_one_dnat_rule_on_the_nodes_bridge() -> None:
    rules = service_route.ruleset("dsnabc123", 6443)
    assert "table ip dsnabc123" in rules
    assert 'iifname "dsnabc123" ip daddr 10.0.0.1 tcp dport 443 dnat to 127.0.0.1:6443' in rules
