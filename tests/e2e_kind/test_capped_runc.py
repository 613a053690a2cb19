"""hack/kind/capped-runc, dockerd's runtime on machines without CAP_SYS_RESOURCE: a privileged container
(kind's node) gets every capability the machine can grant, and runc calls it does not concern pass
through untouched."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from .test_kind import REPO

SCRIPT = REPO / "hack" / "kind" / "capped-runc"


def _module():
    loader = importlib.machinery.SourceFileLoader("capped_runc", str(SCRIPT))
    spec = importlib.util.spec_from_loader("capped_runc", loader)
    assert spec
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


capped_runc = _module()
ALL = [f"CAP_{name}" for name in capped_runc.CAPABILITIES]
WITHOUT_SYS_RESOURCE = sum(1 << bit for bit, name in enumerate(capped_runc.CAPABILITIES) if name != "SYS_RESOURCE")


def test_a_privileged_process_loses_only_what_the_bounding_set_lacks() -> None:
    process = {"args": ["/sbin/init"], "capabilities": {s: list(ALL) for s in ("bounding", "effective", "permitted")}}
    new, dropped = capped_runc.capped(process, capped_runc.grantable(WITHOUT_SYS_RESOURCE))
    assert dropped == ["CAP_SYS_RESOURCE"]
    for name in ("bounding", "effective", "permitted"):
        assert new["capabilities"][name] == [c for c in ALL if c != "CAP_SYS_RESOURCE"]
    assert new["args"] == ["/sbin/init"]


def test_a_process_within_the_bounding_set_is_left_as_it_is() -> None:
    process = {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"]}}
    assert capped_runc.capped(process, capped_runc.grantable(WITHOUT_SYS_RESOURCE)) == (process, [])


def test_create_run_and_exec_name_their_spec_files_and_other_commands_none() -> None:
    spec_file = capped_runc.spec_file
    assert spec_file(["--root", "/r", "create", "--bundle", "/b", "id"], "/cwd") == ("/b/config.json", True)
    assert spec_file(["run", "-b=/b", "id"], "/cwd") == ("/b/config.json", True)
    assert spec_file(["create", "id"], "/cwd") == ("/cwd/config.json", True)
    assert spec_file(["exec", "--process", "/tmp/p.json", "--detach", "id"], "/cwd") == ("/tmp/p.json", False)
    assert spec_file(["exec", "id", "ls"], "/cwd") is None
    assert spec_file(["--root", "/r", "delete", "--force", "id"], "/cwd") is None


def test_the_wrapper_rewrites_the_bundle_and_execs_the_real_runc(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    config = {"ociVersion": "1.0.2", "process": {"capabilities": {"bounding": list(ALL)}}}
    (bundle / "config.json").write_text(json.dumps(config))
    fake_runc = tmp_path / "runc"
    fake_runc.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/called\n")
    fake_runc.chmod(0o755)
    env = {**os.environ, "CAPPED_RUNC_RUNC": str(fake_runc)}
    subprocess.run([sys.executable, str(SCRIPT), "create", "--bundle", str(bundle), "c1"], env=env, check=True)
    assert (tmp_path / "called").read_text().split() == ["create", "--bundle", str(bundle), "c1"]
    bounding = json.loads((bundle / "config.json").read_text())["process"]["capabilities"]["bounding"]
    granted = capped_runc.grantable(capped_runc.bounding_mask())
    assert bounding == [c for c in ALL if c in granted]
