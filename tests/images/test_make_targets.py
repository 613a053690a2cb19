"""images/Makefile.inc run by the real make against a recording stand-in for the docker CLI: which
Dockerfile each target builds, with which build arguments and tag, and how CRIU_REPO/CRIU_REF and the
runtime image's ENTRYPOINT/CMD reach the build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .support import IMAGES, REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")

RUNTIME = "nvcr.io/nvidia/ai-dynamo/vllm-runtime:0.7.0"
# What the stand-in answers for `docker image inspect` of RUNTIME.
INSPECT = {
    "{{json .Config.Entrypoint}}": '["/opt/nvidia/nvidia_entrypoint.sh"]',
    "{{json .Config.Cmd}}": "null",
    "{{if .RepoDigests}}{{index .RepoDigests 0}}{{end}}": "nvcr.io/nvidia/ai-dynamo/vllm-runtime@sha256:0123",
}
FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:2] == ["image", "inspect"] and "-f" in args:
    print({INSPECT!r}[args[args.index("-f") + 1]])
"""


class Make:
    def __init__(self, tmp: Path):
        self.docker = tmp / "docker"
        self.docker.write_text(FAKE_DOCKER)
        self.docker.chmod(0o755)
        self.log = tmp / "docker.log"

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("CRIU_", "RUNTIME_", "IMAGE_"))}
        environment.update({"FAKE_DOCKER_LOG": str(self.log), **(env or {})})
        return subprocess.run(["make", "--no-print-directory", "-f", str(IMAGES / "Makefile.inc"),
                               f"DOCKER={self.docker}", *args],
                              cwd=REPO, env=environment, capture_output=True, text=True, timeout=60)

    def builds(self) -> list[list[str]]:
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if c[:1] == ["build"]]


def build_args(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    return Make(tmp_path)


def chart(name: str) -> tuple[str, str]:
    values = yaml.safe_load((REPO / "helm" / name / "values.yaml").read_text())
    image = values["daemonset"]["image"] if name == "snapshot" else values["image"]
    app_version = yaml.safe_load((REPO / "helm" / name / "Chart.yaml").read_text())["appVersion"]
    return image["repository"], str(app_version)


@pytest.mark.parametrize(("target", "chart_name"), [("agent-image", "snapshot"), ("operator-image", "operator")])
def test_agent_and_operator_images_get_the_names_the_charts_deploy(make: Make, target: str, chart_name: str) -> None:
    result = make(target)
    assert result.returncode == 0, result.stderr
    (argv,) = make.builds()
    repository, version = chart(chart_name)
    assert option(argv, "-t") == f"{repository}:{version}"
    assert Path(REPO, option(argv, "-f")).resolve() == IMAGES / target.removesuffix("-image") / "Dockerfile"
    assert Path(REPO, argv[-1]).resolve() == REPO


def test_unset_criu_repo_and_ref_leave_the_dockerfile_defaults(make: Make) -> None:
    for target in ("agent-image", "placeholder-image"):
        assert make(target, f"RUNTIME_IMAGE={RUNTIME}").returncode == 0
        (argv,) = make.builds()
        assert not {"CRIU_REPO", "CRIU_REF"} & set(build_args(argv)), f"{target}: {argv}"


@pytest.mark.parametrize("target", ["agent-image", "placeholder-image"])
def test_criu_repo_and_ref_reach_both_snapshot_images(make: Make, target: str) -> None:
    fork = ("CRIU_REPO=https://git.example.com/me/criu.git", "CRIU_REF=0123abc")
    assert make(target, f"RUNTIME_IMAGE={RUNTIME}", *fork).returncode == 0
    (argv,) = make.builds()
    args = build_args(argv)
    assert args["CRIU_REPO"] == "https://git.example.com/me/criu.git"
    assert args["CRIU_REF"] == "0123abc"
    # only the ref given alone
    assert make(target, f"RUNTIME_IMAGE={RUNTIME}", "CRIU_REF=v4.2.2").returncode == 0
    (argv,) = make.builds()
    assert build_args(argv).get("CRIU_REF") == "v4.2.2" and "CRIU_REPO" not in build_args(argv)


@pytest.mark.parametrize("target", ["agent-image", "placeholder-image"])
def test_criu_patches_none_builds_both_snapshot_images_with_stock_criu(make: Make, target: str) -> None:
    assert make(target, f"RUNTIME_IMAGE={RUNTIME}", "CRIU_PATCHES=none").returncode == 0
    (argv,) = make.builds()
    assert build_args(argv).get("CRIU_PATCHES") == "none"
    # any other value leaves the Dockerfile's default (the patches copied into the build) in charge
    assert make(target, f"RUNTIME_IMAGE={RUNTIME}", "CRIU_PATCHES=yes").returncode == 0
    (argv,) = make.builds()
    assert "CRIU_PATCHES" not in build_args(argv)


def test_placeholder_records_the_runtime_images_entrypoint_and_builds_on_the_inspected_digest(make: Make) -> None:
    result = make("placeholder-image", f"RUNTIME_IMAGE={RUNTIME}")
    assert result.returncode == 0, result.stderr
    (argv,) = make.builds()
    args = build_args(argv)
    assert args["RUNTIME_ENTRYPOINT"] == '["/opt/nvidia/nvidia_entrypoint.sh"]'
    assert args["RUNTIME_CMD"] == "null"
    assert args["RUNTIME_IMAGE"] == "nvcr.io/nvidia/ai-dynamo/vllm-runtime@sha256:0123"
    assert Path(REPO, option(argv, "-f")).resolve() == IMAGES / "placeholder" / "Dockerfile"
    assert option(argv, "-t") == "vllm-runtime-placeholder:0.7.0"
    assert result.stdout.strip().splitlines()[-1] == "vllm-runtime-placeholder:0.7.0"


@pytest.mark.parametrize(
    ("variables", "tag"),
    [
        (["IMAGE_REGISTRY=registry.example.com/dynamo/"], "registry.example.com/dynamo/vllm-runtime-placeholder:0.7.0"),
        (["RUNTIME_IMAGE=localhost:5000/team/runtime"], "runtime-placeholder:latest"),
        (["RUNTIME_IMAGE=localhost:5000/runtime:2@sha256:99"], "runtime-placeholder:2"),
        (["PLACEHOLDER_IMAGE=my/placeholder:1"], "my/placeholder:1"),
    ],
)
def test_placeholder_name_is_derived_from_the_runtime_or_chosen(make: Make, variables: list[str], tag: str) -> None:
    assert make("placeholder-image", f"RUNTIME_IMAGE={RUNTIME}", *variables).returncode == 0
    assert option(make.builds()[0], "-t") == tag


def test_placeholder_takes_the_runtime_command_from_the_environment_verbatim(make: Make) -> None:
    """For a runtime image that cannot be pulled where the build runs; a shell-form entrypoint carries
    '$' and quotes, which must reach the build unchanged."""
    entrypoint = json.dumps(["/bin/sh", "-c", "exec \"$0\" '$@'"])
    result = make("placeholder-image", f"RUNTIME_IMAGE={RUNTIME}",
                  env={"RUNTIME_ENTRYPOINT": entrypoint, "RUNTIME_CMD": '["serve"]'})
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in make.log.read_text().splitlines()]
    assert [c for c in calls if c[:1] != ["build"]] == [], "nothing to inspect when both are given"
    args = build_args(make.builds()[0])
    assert args["RUNTIME_ENTRYPOINT"] == entrypoint and args["RUNTIME_CMD"] == '["serve"]'
    assert args["RUNTIME_IMAGE"] == RUNTIME


def test_placeholder_without_a_runtime_image_says_how_to_give_one(make: Make) -> None:
    result = make("placeholder-image")
    assert result.returncode != 0
    assert "RUNTIME_IMAGE is not set: make placeholder-image RUNTIME_IMAGE=" in result.stderr
    assert make.builds() == []
