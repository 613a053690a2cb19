"""The agent's configuration file (``--config``; the snapshot chart renders ``config`` into it):

    criu:
      logLevel: 4            # CRIU log verbosity, 0-4
      tcpEstablished: true   # dump established TCP connections instead of refusing them
      networkLock: ""        # "" is CRIU's default (iptables); or nftables
      timeoutSeconds: 600    # a dump or restore is given up after this long
      extraArgs: []          # appended to every CRIU dump and restore command line
      restoreHugePages: ""   # image, force or off: huge pages for restored memory (images/criu/patches)
    restore:
      verifyThreads: 16      # parallel SHA-256 readers of a checkpoint (default: CPUs, at most 16)
      prefetchThreads: 8     # parallel readers of the files a worker declared; 0: no prefetch
    keys:
      directory: /etc/dynamo-snapshot/keys   # the checkpoint keys (a Secret mounted only here; docs/security.md)
    cache:
      dir: ""                # the node-local checkpoint cache (local NVMe, the agent's only); "": no cache
      budgetGiB: 0           # its byte budget; 0: no cache (artifact/nodecache.py). Both are required
                             # with storage.type s3: a restore fetches the version into the cache
    storage:
      type: pvc              # or s3, with storage.s3 (bucket, prefix, endpoint, ...): storageconfig.py

A missing file or key keeps the default; an unknown key or a value of the wrong type is an error that
names it, since a misspelt option silently ignored would make the agent do something else than asked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynamo_snapshot.agent.artifact.authn import DEFAULT_KEY_DIRECTORY, KEY_DIRECTORY_ENV
from dynamo_snapshot.agent.artifact.private import DEFAULT_ROOT as DEFAULT_PRIVATE_DIR
from dynamo_snapshot.agent.container.criu import HUGE_PAGES, CriuSettings
from dynamo_snapshot.agent.service.configfields import ConfigError
from dynamo_snapshot.agent.service.configfields import bounded as _bounded
from dynamo_snapshot.agent.service.configfields import section as _section
from dynamo_snapshot.agent.service.configfields import short as _short
from dynamo_snapshot.agent.service.configfields import typed as _typed
from dynamo_snapshot.agent.service.storageconfig import StorageSettings, storage_settings
from dynamo_snapshot.api import names

NETWORK_LOCKS = ("", "iptables", "nftables", "skip")


def criu_settings(data: dict[str, Any] | None, where: str = "criu") -> CriuSettings:
    section = _section(data, where, {"logLevel", "tcpEstablished", "networkLock", "timeoutSeconds", "extraArgs",
                                     "restoreHugePages"})
    defaults = CriuSettings()
    fields: dict[str, Any] = {}
    if "logLevel" in section:
        fields["log_level"] = _bounded(section, "logLevel", 0, 4, where)
    if "tcpEstablished" in section:
        fields["tcp_established"] = _typed(section, "tcpEstablished", bool, where)
    if "networkLock" in section:
        lock = section["networkLock"] or ""
        if not isinstance(lock, str) or lock not in NETWORK_LOCKS:
            choices = ", ".join(map(repr, NETWORK_LOCKS))
            raise ConfigError(f"{where}.networkLock: {_short(lock)} is not one of {choices}")
        fields["network_lock"] = lock
    if "timeoutSeconds" in section:
        timeout = _typed(section, "timeoutSeconds", int, where)
        if timeout < 1:
            raise ConfigError(f"{where}.timeoutSeconds: must be at least 1, got {timeout}")
        fields["timeout_s"] = timeout
    if "extraArgs" in section:
        extra = section["extraArgs"] or []
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ConfigError(f"{where}.extraArgs: expected a list of strings, got {_short(extra)}")
        fields["extra_args"] = tuple(extra)
    if "restoreHugePages" in section:
        mode = section["restoreHugePages"] or ""
        if not isinstance(mode, str) or mode not in ("", *HUGE_PAGES):
            choices = ", ".join(map(repr, ("", *HUGE_PAGES)))
            raise ConfigError(f"{where}.restoreHugePages: {_short(mode)} is not one of {choices}")
        fields["restore_huge_pages"] = mode
    return CriuSettings(**{**defaults.__dict__, **fields})


@dataclass(frozen=True)
class RestoreSettings:
    verify_threads: int | None = None  # None: artifact.default_io_threads()
    prefetch_threads: int = 8
    # node-local, the agent's only: each restore's verified copies of the parsed images (artifact/private.py)
    private_dir: str = str(DEFAULT_PRIVATE_DIR)


@dataclass(frozen=True)
class CacheSettings:
    dir: str = ""  # "": no node cache
    budget_bytes: int = 0  # 0: no node cache

    @property
    def enabled(self) -> bool:
        return bool(self.dir) and self.budget_bytes > 0


@dataclass(frozen=True)
class AgentConfig:
    criu: CriuSettings = field(default_factory=CriuSettings)
    restore: RestoreSettings = field(default_factory=RestoreSettings)
    key_directory: str = field(default_factory=lambda: key_directory(None))
    cache: CacheSettings = field(default_factory=CacheSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)


def key_directory(data: dict[str, Any] | None, where: str = "keys") -> str:
    section = _section(data, where, {"directory"})
    if "directory" not in section:
        return os.environ.get(KEY_DIRECTORY_ENV, DEFAULT_KEY_DIRECTORY)
    directory = _typed(section, "directory", str, where)
    if not directory.startswith("/"):
        raise ConfigError(f"{where}.directory: expected an absolute path, got {directory!r}")
    return directory


def restore_settings(data: dict[str, Any] | None, where: str = "restore") -> RestoreSettings:
    section = _section(data, where, {"verifyThreads", "prefetchThreads", "privateDir"})
    fields: dict[str, Any] = {}
    if "verifyThreads" in section:
        fields["verify_threads"] = _bounded(section, "verifyThreads", 1, 256, where)
    if "prefetchThreads" in section:
        fields["prefetch_threads"] = _bounded(section, "prefetchThreads", 0, 256, where, " (0: no prefetch)")
    if "privateDir" in section:
        private_dir = _typed(section, "privateDir", str, where)
        if not private_dir.startswith("/") or private_dir.rstrip("/") == "":
            raise ConfigError(f"{where}.privateDir: expected an absolute directory other than /, got {private_dir!r}")
        fields["private_dir"] = private_dir
    return RestoreSettings(**fields)


MAX_CACHE_GIB = 1 << 20


def cache_settings(data: dict[str, Any] | None, restore: RestoreSettings, where: str = "cache") -> CacheSettings:
    """The node cache: off unless both a directory and a budget above 0 are given."""
    section = _section(data, where, {"dir", "budgetGiB"})
    directory = _typed(section, "dir", str, where) if section.get("dir") is not None else ""
    budget = section.get("budgetGiB", 0)
    budget = 0 if budget is None else budget
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget):
        raise ConfigError(f"{where}.budgetGiB: expected a number of GiB, got {_short(budget)}")
    if not 0 <= budget <= MAX_CACHE_GIB:
        raise ConfigError(f"{where}.budgetGiB: must be 0-{MAX_CACHE_GIB} (0: no cache), got {budget}")
    if not directory and not budget:
        return CacheSettings()
    if not directory or not budget:
        missing = f"{where}.dir" if not directory else f"{where}.budgetGiB"
        raise ConfigError(f"{missing}: must be set too when the other is (both, or neither: no cache)")
    if not directory.startswith("/") or directory.rstrip("/") == "":
        raise ConfigError(f"{where}.dir: expected an absolute directory other than /, got {directory!r}")
    mine, private_dir = Path(directory), Path(restore.private_dir)
    if mine == private_dir or private_dir in mine.parents or mine in private_dir.parents:
        raise ConfigError(f"{where}.dir: {directory!r} overlaps restore.privateDir {restore.private_dir!r} "
                          "(emptied at every start); give the cache a directory of its own")
    return CacheSettings(directory.rstrip("/"), int(budget * (1 << 30)))


def load(path: str | Path | None) -> AgentConfig:
    """The agent's configuration file (defaults when there is none). Anything wrong with it - missing,
    unreadable, not text, not YAML, too deeply nested, not the schema - is a ConfigError naming the file
    and the field."""
    if path is None:
        return AgentConfig()
    where = f"agent configuration {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist (--config)") from None
    except IsADirectoryError:
        raise ConfigError(f"{where} is a directory; --config takes a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{where} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte {err.start}); --config takes a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be an agent configuration") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping at the top level (cache, criu, keys, restore, storage), got {_short(data)}")
    try:
        top = _section(data, "(top level)", {"criu", "restore", "keys", "cache", "storage"})
        restore = restore_settings(top.get("restore"))
        cache, storage = cache_settings(top.get("cache"), restore), storage_settings(top.get("storage"))
        if storage.type == names.STORAGE_TYPE_S3 and not cache.enabled:
            missing = "cache.dir" if not cache.dir else "cache.budgetGiB"
            raise ConfigError(f"{missing}: required with storage.type s3 - a restore fetches the checkpoint from the "
                              "bucket into the node cache, which cache.budgetGiB bounds (set cache.dir to a "
                              "directory on local disk and cache.budgetGiB to the GiB it may hold)")
        return AgentConfig(criu_settings(top.get("criu")), restore, key_directory(top.get("keys")), cache, storage)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
