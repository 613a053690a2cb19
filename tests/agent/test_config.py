"""The agent's configuration file and command line: CRIU and restore settings, refused options,
the namespace an agent serves, runtime sockets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_snapshot.agent.container.criu import CriuSettings, DumpOptions, RestoreOptions
from dynamo_snapshot.agent.service import config, main


def test_criu_settings_from_the_chart_config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("criu:\n  logLevel: 2\n  tcpEstablished: false\n  networkLock: ''\n  timeoutSeconds: 600\n"
                    "  extraArgs: [--skip-file-rwx-check]\n")
    settings = config.load(path).criu
    assert settings == CriuSettings(log_level=2, tcp_established=False, network_lock="", timeout_s=600,
                                    extra_args=("--skip-file-rwx-check",))
    dump = DumpOptions.configured(settings, pid=1, images_dir=Path("/i"), freeze_cgroup=Path("/f"), net_ns_inode=1,
                                  pid_ns_inode=2, external_mounts={}).argv()
    assert "--network-lock" not in dump and "--tcp-established" not in dump  # CRIU's defaults
    assert dump[dump.index("--timeout") + 1] == "600" and "-v2" in dump and dump[-1] == "--skip-file-rwx-check"
    restore = RestoreOptions.configured(settings, images_dir="/i", work_dir="/w", pid_ns_fd=3, net_ns_fd=4,
                                        external_mounts={}).argv()
    assert restore[-1] == "--skip-file-rwx-check" and "-v2" in restore
    assert RestoreOptions.configured(settings, images_dir="/i", work_dir="/w", pid_ns_fd=None, net_ns_fd=None,
                                     external_mounts={}).env() == {}
    path.write_text("criu:\n  restoreHugePages: force\n")
    forced = RestoreOptions.configured(config.load(path).criu, images_dir="/i", work_dir="/w", pid_ns_fd=None,
                                       net_ns_fd=None, external_mounts={})
    assert forced.env() == {"DYNAMO_CRIU_RESTORE_THP": "force"}


def test_restore_settings_from_the_config(tmp_path: Path):
    path = tmp_path / "config.yaml"
    assert config.load(None).restore == config.RestoreSettings(verify_threads=None, prefetch_threads=8)
    path.write_text("restore:\n  verifyThreads: 32\n  prefetchThreads: 0\n")
    assert config.load(path).restore == config.RestoreSettings(verify_threads=32, prefetch_threads=0)


@pytest.mark.parametrize("text, complaint", [
    ("restore:\n  verifyThreads: 0\n", "restore.verifyThreads: must be 1-256"),
    ("restore:\n  prefetchThreads: 'many'\n", "restore.prefetchThreads: expected int"),
    ("restore:\n  prefetch: 8\n", "restore: unknown keys prefetch"),
    ("criu:\n  logLevel: 9\n", "criu.logLevel: must be 0-4"),
    ("criu:\n  tcpEstablished: 'yes'\n", "criu.tcpEstablished: expected bool"),
    ("criu:\n  networkLock: ipfw\n", "criu.networkLock"),
    ("criu:\n  restoreHugePages: always\n", "criu.restoreHugePages: 'always' is not one of"),
    ("criu:\n  timeoutSecs: 5\n", "unknown keys timeoutSecs"),
    ("crui: {}\n", "unknown keys crui"),
    ("cache:\n  dir: /var/cache/snap\n", r"cache.budgetGiB: must be set too when the other is"),
    ("cache:\n  budgetGiB: 100\n", r"cache.dir: must be set too when the other is"),
    ("cache:\n  dir: relative\n  budgetGiB: 1\n", "cache.dir: expected an absolute directory"),
    ("cache:\n  dir: /c\n  budgetGiB: -1\n", r"cache.budgetGiB: must be 0-"),
    ("cache:\n  dir: /c\n  budgetGiB: lots\n", "cache.budgetGiB: expected a number of GiB"),
    ("cache:\n  directory: /c\n", "cache: unknown keys directory"),
    ("restore:\n  privateDir: /var/lib/s\ncache:\n  dir: /var/lib/s/cache\n  budgetGiB: 1\n",
     "cache.dir: '/var/lib/s/cache' overlaps restore.privateDir"),
])
def test_a_misspelt_or_wrong_option_is_refused_with_its_name(tmp_path: Path, text: str, complaint: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=complaint):
        config.load(path)


def test_the_node_cache_is_off_unless_a_directory_and_a_budget_are_given(tmp_path: Path):
    path = tmp_path / "config.yaml"
    assert not config.load(None).cache.enabled
    path.write_text("cache:\n  dir: ''\n  budgetGiB: 0\n")  # the chart's default
    assert config.load(path).cache == config.CacheSettings()
    path.write_text(f"cache:\n  dir: {tmp_path / 'cache'}/\n  budgetGiB: 1.5\n")
    settings = config.load(path).cache
    assert settings == config.CacheSettings(str(tmp_path / "cache"), 3 << 29) and settings.enabled
    parser = main.build_parser()
    options = main.options_from(parser.parse_args(["--node-name=n", "--namespace=a", f"--config={path}"]), parser)
    cache = main.node_cache(options)
    assert cache is not None and cache.budget_bytes == 3 << 29 and (tmp_path / "cache").is_dir()
    cache.close()


def test_agent_mount_serves_only_its_own_namespace_and_needs_to_know_it():
    parser = main.build_parser()
    args = parser.parse_args(["--node-name=n", "--namespace=team-a"])
    assert main.options_from(args, parser).watched_namespace == "team-a"
    args = parser.parse_args(["--node-name=n", "--namespace=infra", "--storage-access-mode=podMount"])
    assert main.options_from(args, parser).watched_namespace is None  # one agent for the cluster
    args = parser.parse_args(["--node-name=n", "--namespace=infra", "--storage-access-mode=podMount",
                              "--namespace-restricted"])
    assert main.options_from(args, parser).watched_namespace == "infra"
    env = {k: v for k, v in os.environ.items() if k not in ("POD_NAMESPACE", "NODE_NAME")}
    result = subprocess.run([sys.executable, "-m", "dynamo_snapshot.agent.service.main", "--node-name=n"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "--namespace is required with agentMount" in result.stderr


def test_the_runtime_socket_defaults_by_runtime_type():
    parser = main.build_parser()
    args = parser.parse_args(["--node-name=n", "--namespace=a", "--runtime-type=crio"])
    assert main.options_from(args, parser).runtime_socket == "/var/run/crio/crio.sock"
