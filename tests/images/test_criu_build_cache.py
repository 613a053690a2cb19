"""hack/build-criu.sh keys its cache directory by the patch set it applies (images/criu/patches by
default), and dynamo_snapshot.agent.container.criu.cache_dir() names the same directory, so the agent,
the tests and the benchmarks find the CRIU the script built: patched by default, stock with
CRIU_PATCHES=none (the directory a stock build always had)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dynamo_snapshot.agent.container import criu

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "build-criu.sh"


def printed(env: dict[str, str]) -> Path:
    clean = {k: v for k, v in os.environ.items() if k not in (criu.PATCHES_ENV, criu.CACHE_ENV)}
    out = subprocess.run(["bash", str(SCRIPT), "--print-dir"], env={**clean, **env}, check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return Path(out.strip())


def test_the_patched_build_directory_is_named_by_the_patch_set_and_the_agent_finds_the_same(tmp_path: Path) -> None:
    env = {criu.CACHE_ENV: str(tmp_path)}
    name = printed(env)
    assert name == criu.cache_dir(env)
    assert name.parent == tmp_path and name.name.startswith(f"criu-{criu.DEFAULT_CRIU_VERSION}-p")
    assert len(name.name.rsplit("-p", 1)[1]) == 12


def test_criu_patches_none_builds_into_the_stock_directory(tmp_path: Path) -> None:
    env = {criu.CACHE_ENV: str(tmp_path), criu.PATCHES_ENV: "none"}
    assert printed(env) == criu.cache_dir(env) == tmp_path / f"criu-{criu.DEFAULT_CRIU_VERSION}"


def test_a_changed_patch_is_a_new_directory_and_an_empty_patch_set_is_stock(tmp_path: Path) -> None:
    patches = tmp_path / "patches"
    patches.mkdir()
    env = {criu.CACHE_ENV: str(tmp_path), criu.PATCHES_ENV: str(patches)}
    assert printed(env) == criu.cache_dir(env) == tmp_path / f"criu-{criu.DEFAULT_CRIU_VERSION}"
    (patches / "0001-a.patch").write_text("one\n")
    (patches / "0002-b.patch").write_text("two\n")
    (patches / "README.md").write_text("not a patch\n")
    first = printed(env)
    assert first == criu.cache_dir(env) != tmp_path / f"criu-{criu.DEFAULT_CRIU_VERSION}"
    (patches / "0002-b.patch").write_text("two, fixed\n")
    second = printed(env)
    assert second == criu.cache_dir(env) != first


def test_a_patch_directory_that_is_not_there_fails_naming_it(tmp_path: Path) -> None:
    env = {criu.CACHE_ENV: str(tmp_path), criu.PATCHES_ENV: str(tmp_path / "nope")}
    result = subprocess.run(["bash", str(SCRIPT), "--print-dir"], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"CRIU_PATCHES={tmp_path / 'nope'} is not a directory" in result.stderr
