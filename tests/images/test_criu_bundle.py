"""images/criu/build.sh, the CRIU stage of both snapshot images: it fetches CRIU_REF from CRIU_REPO (a
tag, branch or commit), builds it and bundles it so that dynamo_snapshot.agent.container.criu runs it.

The repository is a local git repository made from the CRIU release tarball hack/build-criu.sh
downloaded (the build machine may not reach GitHub); the build needs CRIU's build dependencies
(hack/ci/containers.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_snapshot.agent.container.criu import CriuBundle
from tests.agent import node_harness as harness

from .support import IMAGES

BUILD = IMAGES / "criu" / "build.sh"
TARBALL = harness.CACHE / "build" / f"criu-{harness.CRIU_VERSION}" / f"criu_{harness.CRIU_VERSION}.orig.tar.xz"


def _missing() -> str | None:
    if not TARBALL.is_file():
        return f"no CRIU release tarball at {TARBALL} (run hack/build-criu.sh)"
    for tool in ("git", "make", "gcc", "pkg-config", "protoc-c", "tar", "xz"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run hack/ci/containers.sh)"
    return None


pytestmark = [pytest.mark.containers, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def criu_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A CRIU fork: the release as one commit tagged v<version>, and a commit on top of it."""
    top = tmp_path_factory.mktemp("criu-fork")
    subprocess.run(["tar", "-C", str(top), "-xf", str(TARBALL)], check=True)
    repo = top / f"criu-{harness.CRIU_VERSION}"
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "release", cwd=repo)
    git("tag", f"v{harness.CRIU_VERSION}", cwd=repo)
    (repo / "FORK").write_text("a fork's own change\n")
    git("add", "FORK", cwd=repo)
    git("commit", "-qm", "fork", cwd=repo)
    return f"file://{repo}", git("rev-parse", "HEAD", cwd=repo)


def build(repo: str, ref: str, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUILD), repo, ref, str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(env or {})})


def test_builds_a_commit_of_a_fork_into_a_bundle_the_agent_runs(criu_repo, tmp_path: Path) -> None:
    url, commit = criu_repo
    result = build(url, commit, tmp_path / "bundle")
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = CriuBundle(tmp_path / "bundle")
    assert bundle.version() == harness.CRIU_VERSION
    assert (tmp_path / "bundle" / "VERSION").read_text().strip() == harness.CRIU_VERSION
    assert (tmp_path / "bundle" / ".complete").is_file()
    # images/criu/patches applied, as hack/build-criu.sh applies them: one CRIU for tests and images
    version = subprocess.run([*bundle.command(), "--version"], capture_output=True, text=True, check=True).stdout
    assert "Patches: dynamo-parallel-pages" in version
    patches = sorted(p.name for p in (IMAGES / "criu" / "patches").glob("*.patch"))
    assert [line.split()[1] for line in (tmp_path / "bundle" / "PATCHES").read_text().splitlines()] == patches
    # Every library comes from the bundle: it must run in a mount namespace without them.
    libs = {p.name for p in (tmp_path / "bundle" / "lib").iterdir()}
    assert "libc.so.6" in libs and "libprotobuf-c.so.1" in libs


@pytest.mark.parametrize("ref", ["v9.9.9", "no-such-branch"])
def test_an_unknown_ref_fails_naming_it(criu_repo, tmp_path: Path, ref: str) -> None:
    url, _ = criu_repo
    result = build(url, ref, tmp_path / "bundle")
    assert result.returncode != 0
    assert f"has no tag, branch or commit '{ref}': check CRIU_REF" in result.stderr
    assert not (tmp_path / "bundle").exists()


def test_an_unreachable_repository_fails_naming_it(tmp_path: Path) -> None:
    result = build(f"file://{tmp_path}/nothing", "v4.2.1", tmp_path / "bundle")
    assert result.returncode != 0
    assert "check CRIU_REPO" in result.stderr


def test_a_patch_that_does_not_apply_to_the_ref_fails_naming_it_and_the_way_out(criu_repo, tmp_path: Path) -> None:
    url, commit = criu_repo
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "0001-other.patch").write_text(
        "--- a/FORK\n+++ b/FORK\n@@ -1 +1 @@\n-not what the fork has\n+changed\n"
    )
    result = build(url, commit, tmp_path / "bundle", {"CRIU_PATCHES": str(patches)})
    assert result.returncode != 0
    assert f"{patches}/0001-other.patch does not apply to {url} {commit}" in result.stderr
    assert "CRIU_PATCHES=none" in result.stderr
    assert not (tmp_path / "bundle").exists()
