"""Bad agent configuration and kubeconfig files get one clear line naming the file or field and exit code 2,
never a traceback; generated configurations (hypothesis, a bounded number) either load or are refused so."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_snapshot.agent.service import config, main

GOOD_KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() points the logs at the stderr it finds (here capsys's, closed after the test): not in tests."""
    from dynamo_snapshot import logs

    monkeypatch.setattr(logs, "configure", lambda *_args, **_kw: None)


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main.main(["--node-name=n", "--namespace=ns", *args])
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("content, complaint", [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", "is not UTF-8 text"),
    (b"criu: [" * 2000, "(not valid YAML|nested too deeply)"),
    (b"{1: 2}\n", r"keys must be strings, got 1"),
    (b"criu: {7: true}\n", r"criu: keys must be strings, got 7"),
    (b"- a\n- b\n", "expected a mapping at the top level"),
    (b"criu:\n  networkLock: [1]\n", "criu.networkLock"),
    (b"criu:\n  extraArgs: {a: " + b"[" * 50 + b"]" * 50 + b"}\n", "criu.extraArgs: expected a list of strings"),
])
def test_an_unusable_config_file_is_refused_by_name_with_exit_code_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, complaint: str):
    path = tmp_path / "agent.yaml"
    path.write_bytes(content)
    code, err = run_main(capsys, f"--config={path}")
    assert code == 2
    assert f"agent configuration {path}" in err and "Traceback" not in err
    assert re.search(complaint, err), err


def test_a_directory_or_a_missing_file_as_config_is_refused_by_name(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]):
    code, err = run_main(capsys, f"--config={tmp_path}")
    assert code == 2 and "is a directory" in err and str(tmp_path) in err
    code, err = run_main(capsys, f"--config={tmp_path / 'nope.yaml'}")
    assert code == 2 and "does not exist" in err and "nope.yaml" in err


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00\x01", b"[[[[", b"- 1\n", b"clusters: 7\n"])
def test_a_missing_or_unusable_kubeconfig_is_refused_by_name_with_exit_code_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None):
    kubeconfig = tmp_path / "kubeconfig"
    if content is not None:
        kubeconfig.write_bytes(content)
    code, err = run_main(capsys, f"--kubeconfig={kubeconfig}")
    assert code == 2 and str(kubeconfig) in err and "Traceback" not in err, err


def test_a_directory_as_kubeconfig_is_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, err = run_main(capsys, f"--kubeconfig={tmp_path}")
    assert code == 2 and str(tmp_path) in err and "Traceback" not in err, err


def test_a_good_kubeconfig_passes_the_check(tmp_path: Path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(GOOD_KUBECONFIG)
    assert main.kubeconfig_problem(str(kubeconfig)) is None


# -- generated configurations ----------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                    st.text(max_size=12), st.sampled_from(["", "nftables", "iptables", "skip"]))
keys = st.one_of(st.sampled_from(["criu", "restore", "logLevel", "tcpEstablished", "networkLock",
                                  "timeoutSeconds", "extraArgs", "verifyThreads", "prefetchThreads",
                                  "cache", "dir", "budgetGiB"]),
                 st.text(max_size=8), st.integers(-3, 3), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
sections = st.dictionaries(keys, values, max_size=5)
documents = st.one_of(values, st.dictionaries(st.sampled_from(["criu", "restore", "cache"]) | keys,
                                              st.one_of(sections, values), max_size=3))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents)
def test_generated_configs_load_or_are_refused_by_name(tmp_path: Path, document: object):
    path = tmp_path / "generated.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        config.load(path)
    except config.ConfigError as err:
        assert str(err).startswith(f"agent configuration {path}") and len(str(err)) < 600


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_generated_bytes_load_or_are_refused_by_name(tmp_path: Path, content: bytes):
    path = tmp_path / "generated.yaml"
    path.write_bytes(content)
    try:
        config.load(path)
    except config.ConfigError as err:
        assert str(err).startswith(f"agent configuration {path}")
