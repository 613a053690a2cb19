"""images/agent/fetch_cri_proto.py, which gives the agent image's build the CRI proto without Go: the
module zip from a Go module proxy, as `go mod download` fetches it. Go's own module cache download
directory is a valid GOPROXY (file://), so the test needs no network once Go has the module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_snapshot.agent.container.cri_stubs import CRI_API_VERSION

from .support import load_script


def module_cache() -> Path | None:
    go = shutil.which("go")
    if go is None:
        return None
    cache = Path(subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout.strip())
    return cache if (cache / "k8s.io" / f"cri-api@{CRI_API_VERSION}").is_dir() else None


@pytest.fixture
def fetch():
    return load_script("images/agent/fetch_cri_proto.py")


@pytest.mark.skipif(module_cache() is None, reason=f"Go's module cache has no k8s.io/cri-api@{CRI_API_VERSION}")
def test_fetches_the_pinned_cri_proto_from_a_go_proxy(fetch, tmp_path: Path) -> None:
    cache = module_cache()
    assert cache is not None
    out = tmp_path / "api.proto"
    proxy = f"file://{cache}/cache/download"
    assert fetch.main(["--out", str(out), "--goproxy", f"file:///nonexistent,{proxy},direct"]) == 0
    expected = cache / "k8s.io" / f"cri-api@{CRI_API_VERSION}" / "pkg" / "apis" / "runtime" / "v1" / "api.proto"
    assert out.read_bytes() == expected.read_bytes()


def test_an_unreachable_proxy_fails_naming_the_module_and_the_fix(fetch, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as failed:
        fetch.main(["--out", str(tmp_path / "api.proto"), "--goproxy", f"file://{tmp_path}/none,direct"])
    message = str(failed.value)
    assert f"k8s.io/cri-api@{CRI_API_VERSION}" in message and "set GOPROXY" in message
    assert not (tmp_path / "api.proto").exists()


def test_module_paths_are_escaped_as_go_does(fetch) -> None:
    assert fetch.escape("github.com/BurntSushi/toml") == "github.com/!burnt!sushi/toml"
    assert fetch.proxies("https://a.example, https://b.example|direct,https://never") == [
        "https://a.example", "https://b.example"]
