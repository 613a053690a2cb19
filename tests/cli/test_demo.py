"""`dynamo-snapshot demo` (`make run`) on a machine that cannot run the node part: it says why in one
line and still shows what it can (the control plane, the CRDs, the example). The whole flow it runs
otherwise is the end-to-end suite's (tests/e2e, the same devcluster.scenarios)."""

from __future__ import annotations

import pytest

from dynamo_snapshot import logs
from dynamo_snapshot.cli import demo
from dynamo_snapshot.devcluster import binaries, stack

pytestmark = pytest.mark.integration


def test_without_a_node_the_demo_says_why_and_shows_the_control_plane(monkeypatch, tmp_path, capsys):
    try:
        binaries.require()
    except binaries.MissingBinaries as err:
        pytest.skip(f"no local control plane: {err}")
    monkeypatch.setattr(stack, "missing", lambda: "needs root (containerd, runc and the kubelet run as root)")
    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)  # leave the session's logging alone

    assert demo.run_demo(keep=False, workdir=str(tmp_path / "demo")) == 0

    out = capsys.readouterr().out
    assert "the node part of the flow cannot run here: needs root (containerd, runc and the kubelet run as root)" in out
    assert "legacy identity hash (the checkpoint ID the operator resolves): " in out
    assert "stopping the local control plane" in out


def test_demo_s3_without_minio_says_how_to_build_it(monkeypatch, tmp_path, capsys):
    from dynamo_snapshot.cli.main import build_parser
    from dynamo_snapshot.devcluster import minio

    assert build_parser().parse_args(["demo", "--s3"]).s3 is True
    monkeypatch.setattr(stack, "missing", lambda: None)
    monkeypatch.setattr(minio, "missing", lambda: "no MinIO binary at /x: run hack/build-minio.sh")
    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)
    assert demo.run_demo(keep=False, workdir=str(tmp_path / "demo"), storage="s3") == 2
    assert "error: --s3: no MinIO binary at /x: run hack/build-minio.sh" in capsys.readouterr().out
