"""Generated snapshotctl manifests and flags and operator configurations: each one is accepted or refused
with a message naming the field or flag - never a traceback, and nothing contacts a cluster."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_snapshot.api import InvalidObject, parse_config
from dynamo_snapshot.cli.manifest import ManifestError
from dynamo_snapshot.cli.snapshotctl import Plan, build_parser, plan

EXAMPLE = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "snapshotctl-pod.yaml").read_text())
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                                                       inner, max_size=3)), max_leaves=12)
POD_PATHS = [("kind",), ("metadata",), ("metadata", "labels"), ("metadata", "annotations"), ("metadata", "namespace"),
             ("spec",), ("spec", "containers"), ("spec", "volumes"), ("spec", "containers", 0),
             ("spec", "containers", 0, "env"), ("spec", "containers", 0, "image"), ("spec", "containers", 0, "name"),
             ("spec", "containers", 0, "command"), ("spec", "containers", 0, "volumeMounts"), ("spec", "nodeSelector")]


def _mutated(path: tuple, value: object) -> dict:
    pod = copy.deepcopy(EXAMPLE)
    node = pod
    for key in path[:-1]:
        node = node[key] if isinstance(node, dict) or (isinstance(node, list) and len(node) > key) else None
        if node is None or not isinstance(node, dict | list):
            return pod
    if isinstance(node, dict):
        node[path[-1]] = value
    return pod


def _outcome(argv: list[str]) -> Plan | ManifestError:
    args = build_parser().parse_args(argv)
    try:
        return plan(args)
    except ManifestError as err:
        return err


def _names_something(err: Exception) -> bool:
    return ":" in str(err) and len(str(err)) > 10


@FUZZ
@given(path=st.sampled_from(POD_PATHS), value=values, command=st.sampled_from(["checkpoint", "restore"]))
def test_a_mutated_pod_manifest_is_accepted_or_refused_by_field(tmp_path_factory, path, value, command):
    manifest = tmp_path_factory.mktemp("m") / "pod.yaml"
    manifest.write_text(yaml.safe_dump(_mutated(path, value)))
    flags = ["--container", "main"] if command == "checkpoint" else ["--containers", "main", "--checkpoint-id", "c1"]
    outcome = _outcome([command, "--manifest", str(manifest), *flags])
    assert isinstance(outcome, Plan) or _names_something(outcome), outcome


@FUZZ
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.integers(1, 3000).map(lambda n: b"[" * n), st.integers(1, 3000).map(lambda n: b"a: " * n)))
def test_arbitrary_bytes_as_a_manifest_are_refused_by_name(tmp_path_factory, content):
    manifest = tmp_path_factory.mktemp("m") / "pod.yaml"
    manifest.write_bytes(content)
    outcome = _outcome(["checkpoint", "--manifest", str(manifest), "--container", "main"])
    assert isinstance(outcome, ManifestError) and _names_something(outcome), outcome


FLAG_VALUES = st.one_of(st.sampled_from(["tmp", "versions", "", "..", "../../etc", "/", "/checkpoints", "A", "(",
                                         "[a-", "x" * 80, "main,main", "main,", "8Gi", "-1", "0", "nan"]),
                        st.text(max_size=20))


@FUZZ
@given(flag=st.sampled_from(["--checkpoint-id", "--base-path", "--placeholder-pattern", "--pvc", "--namespace",
                             "--container", "--shared-memory"]), value=FLAG_VALUES)
def test_a_fuzzed_flag_is_accepted_or_refused_naming_the_flag(tmp_path_factory, flag, value):
    manifest = tmp_path_factory.mktemp("m") / "pod.yaml"
    manifest.write_text(yaml.safe_dump(EXAMPLE))
    argv = ["checkpoint", "--manifest", str(manifest)] + ([] if flag == "--container" else ["--container", "main"])
    outcome = _outcome([*argv, f"{flag}={value}"])
    if isinstance(outcome, ManifestError):
        assert flag in str(outcome) or "container" in str(outcome), outcome
    if flag == "--checkpoint-id" and value in ("tmp", "versions", "", "..", "../../etc"):
        assert isinstance(outcome, ManifestError)
    if flag == "--base-path" and value in ("..", "../../etc", "/", ""):
        assert isinstance(outcome, ManifestError)


CONFIG_KEYS = st.sampled_from(["checkpoint", "enabled", "enable", "storage", "pvc", "pvcName", "pvc_name", "create",
                               "size", "accessMode", "basePath", "checkpointt", "dynamo-operator", "type", 7])
configs = st.recursive(scalars, lambda inner: st.dictionaries(CONFIG_KEYS, inner, max_size=4), max_leaves=10)


@FUZZ
@given(config=st.one_of(configs, st.binary(max_size=100)))
def test_a_fuzzed_operator_configuration_is_accepted_or_refused_by_key(config):
    data = config if isinstance(config, bytes) else yaml.safe_dump(config)
    try:
        parse_config(data)
    except InvalidObject as err:
        assert str(err), config


def test_misspelt_operator_settings_are_refused_with_the_closest_one():
    for text, message in [("checkpoint: {enable: true}", "checkpoint.enable: unknown setting - did you mean 'enabled'"),
                          ("checkpoint: {storage: {pvc: {pvc_name: x}}}", "did you mean 'pvcName'"),
                          ("checkpointt: {}", "checkpointt: unknown setting - did you mean 'checkpoint'")]:
        try:
            parse_config(text)
        except InvalidObject as err:
            assert message in str(err)
        else:
            raise AssertionError(f"{text} was accepted")


KUBECONFIG_KEYS = st.sampled_from(["clusters", "users", "contexts", "current-context", "name", "cluster", "user",
                                   "context", "server", "token", "namespace", "x"])
kubeconfigs = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(KUBECONFIG_KEYS, inner, max_size=4)),
                           max_leaves=14)


@FUZZ
@given(document=st.one_of(kubeconfigs, st.binary(max_size=80)))
def test_a_fuzzed_kubeconfig_is_loaded_or_refused_by_name(tmp_path_factory, document):
    from dynamo_snapshot.kube.config import load_kubeconfig
    from dynamo_snapshot.kube.errors import ConfigError

    path = tmp_path_factory.mktemp("k") / "kubeconfig"
    path.write_bytes(document if isinstance(document, bytes) else yaml.safe_dump(document).encode())
    try:
        load_kubeconfig(str(path))
    except ConfigError as err:
        assert "kubeconfig" in str(err) or str(path) in str(err) or ":" in str(err), err
