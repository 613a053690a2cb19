"""The three Dockerfiles, checked without a Docker engine: what each image runs, that its build
arguments reach the stages that use them, that everything it copies is in the build context, and that
they agree with the code and the charts that rely on them."""

from __future__ import annotations

import subprocess
import tomllib

import pytest
import yaml

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.api import names
from dynamo_snapshot.workload import init

from . import dockerfile
from .support import DOCKERFILES, REPO, layout

UPSTREAM_CRIU = "https://github.com/checkpoint-restore/criu.git"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def checkout_files(source: str) -> list[str]:
    """The files under ``source`` that a fresh checkout has (git-ignored build output left out)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", source],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (REPO / f).is_file()]


@pytest.fixture(params=sorted(DOCKERFILES))
def image(request) -> tuple[str, dockerfile.Dockerfile]:
    return request.param, dockerfile.parse(DOCKERFILES[request.param])


def test_every_variable_is_declared_where_it_is_used(image) -> None:
    """Docker forgets a global ARG inside a stage unless the stage declares it again: an undeclared
    variable silently expands to nothing (an empty CRIU_REF, an empty FROM)."""
    name, parsed = image
    for stage in parsed.stages:
        assert dockerfile.variables(stage.base) <= set(parsed.global_args), f"{name}: FROM {stage.base}"
    # The placeholder appends to the runtime image's own PYTHONPATH, which comes from its base image.
    from_base = {"PYTHONPATH"} if name == "placeholder" else set()
    for stage in parsed.stages:
        known = set(dockerfile.PREDEFINED) | from_base
        inherited = next((s for s in parsed.stages if s.name == stage.base), None)
        if inherited is not None:
            known |= inherited.env_names()  # ENV carries into a stage built FROM another; ARG does not
        for instruction in stage.instructions:
            used = dockerfile.variables(instruction.value)
            assert used <= known, (
                f"{name}: line {instruction.line} uses {sorted(used - known)} without an ARG in stage "
                f"{stage.name or '(final)'}"
            )
            if instruction.keyword == "ARG":
                known.add(instruction.value.partition("=")[0].strip())
            if instruction.keyword == "ENV":
                known |= {w.partition("=")[0] for w in instruction.value.split() if "=" in w}


def test_every_copied_file_is_in_the_repository_and_the_build_context(image) -> None:
    name, parsed = image
    rules = DOCKERFILES[name].with_name("Dockerfile.dockerignore")
    sources = []
    for stage in parsed.stages:
        for instruction in stage.all("COPY"):
            flags, words = instruction.flags_and_args()
            if "from" not in flags:
                sources += words[:-1]
    assert sources, f"{name}: copies nothing from the context"
    for source in sources:
        assert (REPO / source).exists(), f"{name}: COPY {source}: no such path in the repository"
        files = checkout_files(source)
        assert files, f"{name}: COPY {source} copies no file of a checkout"
        for relative in files:
            assert not dockerfile.ignored(rules, relative), f"{name}: {rules.name} leaves out {relative}"


def test_the_build_context_leaves_out_the_checkouts_local_state(image) -> None:
    name, _ = image
    rules = DOCKERFILES[name].with_name("Dockerfile.dockerignore")
    for local in (".venv/bin/python", ".local/cluster/admin.kubeconfig", "tests/conftest.py",
                  "dynamo_snapshot/agent/container/_cri/runtime_v1_pb2.py", "dynamo_snapshot/__pycache__/x.pyc"):
        assert dockerfile.ignored(rules, local), f"{name}: {local} would be sent to the builder"


@pytest.mark.parametrize("name", ["agent", "placeholder"])
def test_criu_repo_and_ref_default_to_upstream_criu_4_2_1(name: str) -> None:
    parsed = dockerfile.parse(DOCKERFILES[name])
    assert parsed.global_args["CRIU_REPO"] == UPSTREAM_CRIU
    assert parsed.global_args["CRIU_REF"] == "v4.2.1"
    criu_stage = parsed.stage("criu")
    assert {"CRIU_REPO", "CRIU_REF"} <= set(criu_stage.args())
    (run,) = criu_stage.all("RUN")
    assert '"$CRIU_REPO" "$CRIU_REF"' in run.value


@pytest.mark.parametrize("name", ["agent", "placeholder"])
def test_both_snapshot_images_apply_the_criu_patches_unless_told_none(name: str) -> None:
    criu_stage = dockerfile.parse(DOCKERFILES[name]).stage("criu")
    patches = criu_stage.args()["CRIU_PATCHES"]
    copies = [c.flags_and_args()[1] for c in criu_stage.all("COPY")]
    assert ["images/criu/patches/", f"{patches}/"] in copies
    (run,) = criu_stage.all("RUN")
    assert 'CRIU_PATCHES="$CRIU_PATCHES"' in run.value


def test_both_snapshot_images_build_criu_the_same_way() -> None:
    """The same stage text lets BuildKit build CRIU once, and the agent restores with the CRIU the
    placeholder carries."""
    agent, placeholder = (dockerfile.parse(DOCKERFILES[n]) for n in ("agent", "placeholder"))
    assert agent.stage("criu").text() == placeholder.stage("criu").text()
    assert agent.stage("criu").base == placeholder.stage("criu").base
    assert agent.global_args["BUILDER_IMAGE"] == placeholder.global_args["BUILDER_IMAGE"]


def test_placeholder_runs_snapshot_init_with_the_runtime_entrypoint() -> None:
    parsed = dockerfile.parse(DOCKERFILES["placeholder"])
    final = parsed.final
    assert final.base == "${RUNTIME_IMAGE}"
    entrypoint = final.last("ENTRYPOINT").exec_form()
    assert entrypoint == layout().ENTRYPOINT == [names.SNAPSHOT_INIT_PATH, init.RUNTIME_ENTRYPOINT_FLAG]
    # An inherited CMD would be reset by ENTRYPOINT anyway; an empty one says so, and snapshot-init
    # substitutes the runtime's recorded CMD when the container gives no args.
    assert final.last("CMD").exec_form() == layout().CMD == []
    assert init.RUNTIME_COMMAND_FILE.name == layout().RUNTIME_COMMAND_FILE.rsplit("/", 1)[1]
    (env,) = final.all("ENV")
    assert env.value == "PYTHONPATH=${PYTHONPATH:+${PYTHONPATH}:}" + layout().APP_DIR
    # Only COPY into the runtime image: it may run as a non-root USER and lack a shell or package manager.
    assert not final.all("RUN") and not final.all("USER")
    (copy,) = final.all("COPY")
    assert copy.flags_and_args() == ({"from": "tooling"}, ["/out/", "/"])


def test_placeholder_requires_the_runtime_command_from_the_build() -> None:
    """RUNTIME_ENTRYPOINT and RUNTIME_CMD have no default: a placeholder built without them must fail
    the build (layout.py refuses empty values) instead of silently dropping the runtime's entrypoint."""
    parsed = dockerfile.parse(DOCKERFILES["placeholder"])
    args = parsed.stage("tooling").args()
    assert args["RUNTIME_ENTRYPOINT"] is None and args["RUNTIME_CMD"] is None
    (run,) = parsed.stage("tooling").all("RUN")
    assert '--runtime-entrypoint "$RUNTIME_ENTRYPOINT"' in run.value and '--runtime-cmd "$RUNTIME_CMD"' in run.value
    assert layout().main(["--out", "/nonexistent", "--runtime-image", "x", "--runtime-entrypoint", "",
                          "--runtime-cmd", "null"]) == 2


def test_agent_image_runs_the_agent_with_the_criu_bundle_and_cri_stubs() -> None:
    parsed = dockerfile.parse(DOCKERFILES["agent"])
    final = parsed.final
    (entrypoint,) = final.last("ENTRYPOINT").exec_form()
    assert entrypoint in PYPROJECT["project"]["scripts"]
    assert PYPROJECT["project"]["scripts"][entrypoint] == "dynamo_snapshot.agent.service.main:main"
    bundle_copy = [c for c in final.all("COPY") if c.flags_and_args()[0].get("from") == "criu"]
    assert [c.flags_and_args()[1] for c in bundle_copy] == [["/criu", str(criu.IMAGE_BUNDLE)]]
    stubs = " ".join(r.value for r in parsed.stage("python").all("RUN"))
    assert "python -m dynamo_snapshot.agent.container.cri_stubs" in stubs and "DYN_SNAPSHOT_CRI_PROTO=" in stubs
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    assert parsed.stage("python").args()["AGENT_EXTRAS"] == "gpu"


def test_operator_image_matches_the_charts_security_context() -> None:
    parsed = dockerfile.parse(DOCKERFILES["operator"])
    values = yaml.safe_load((REPO / "helm" / "operator" / "values.yaml").read_text())
    security = values["podSecurityContext"]
    assert parsed.final.last("USER").value == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    # Nothing may need to write at run time: bytecode is compiled at build time and never written.
    assert "compileall" in " ".join(r.value for r in parsed.stage("python").all("RUN"))
    assert "PYTHONDONTWRITEBYTECODE" in parsed.final.env_names()
    deployment = (REPO / "helm" / "operator" / "templates" / "deployment.yaml").read_text()
    command = parsed.final.last("ENTRYPOINT").exec_form()
    assert command[0] in PYPROJECT["project"]["scripts"]
    assert f"- {command[0]}\n            - {command[1]}\n" in deployment
