"""The shape of ``manifest.json``, checked once before any of it is used: every field the agent reads,
with the type it must have. A malformed manifest is refused with the field's name and what was
expected (never an AttributeError or KeyError from deep inside a restore).

    top       formatVersion (int), checkpointID (str), compatibility (object), files (list)
    files     each an object: path (non-empty str), size (int >= 0), and either sha256 (64 hex digits)
              or chunkBytes (int > 0) with chunkSha256 (list of 64-hex-digit strings)
    workload  optional object: rootPID (int), pids (list of int), stdio (list of str),
              rereadAfterRestore (list of str)
    criu      optional object: externalMounts (object of str to str)
"""

from __future__ import annotations

import re
from typing import Any

from dynamo_snapshot.agent.errors import ArtifactInvalid

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, expected: str, value: Any) -> None:
        raise ArtifactInvalid(f"{self.where}: field {field} must be {expected}, got {_kind(value)} {value!r:.80}")

    def typed(self, data: dict[str, Any], key: str, field: str, kind: type, expected: str, required: bool) -> Any:
        if key not in data:
            if required:
                raise ArtifactInvalid(f"{self.where}: field {field} is missing (expected {expected})")
            return None
        value = data[key]
        ok = _is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            self.fail(field, expected, value)
        return value

    def list_of(self, data: dict[str, Any], key: str, field: str, kind: type, expected: str) -> None:
        values = self.typed(data, key, field, list, f"a list of {expected}", required=False) or []
        for i, value in enumerate(values):
            if not (_is_int(value) if kind is int else isinstance(value, kind)):
                self.fail(f"{field}[{i}]", expected, value)


def check(manifest: dict[str, Any], where: str) -> None:
    """Raise ArtifactInvalid naming the first field of ``manifest`` that has the wrong shape."""
    c = _Checker(where)
    c.typed(manifest, "formatVersion", "formatVersion", int, "an integer", required=True)
    c.typed(manifest, "checkpointID", "checkpointID", str, "a string", required=True)
    c.typed(manifest, "compatibility", "compatibility", dict, "an object", required=True)
    files = c.typed(manifest, "files", "files", list, "a list of file entries", required=True)
    for i, entry in enumerate(files):
        field = f"files[{i}]"
        if not isinstance(entry, dict):
            c.fail(field, "an object with path, size and sha256", entry)
        path = c.typed(entry, "path", f"{field}.path", str, "a relative path", required=True)
        if not path:
            c.fail(f"{field}.path", "a non-empty relative path", path)
        size = c.typed(entry, "size", f"{field}.size", int, "a byte count (integer)", required=True)
        if size < 0:
            c.fail(f"{field}.size", "a byte count of at least 0", size)
        if "chunkBytes" in entry:
            chunk = c.typed(entry, "chunkBytes", f"{field}.chunkBytes", int, "a positive integer", required=True)
            if chunk <= 0:
                c.fail(f"{field}.chunkBytes", "a positive integer", chunk)
            c.list_of(entry, "chunkSha256", f"{field}.chunkSha256", str, "SHA-256 hex digests")
        else:
            digest = c.typed(entry, "sha256", f"{field}.sha256", str, "a SHA-256 hex digest", required=True)
            if not _HEX64.match(digest):
                c.fail(f"{field}.sha256", "64 lowercase hex digits", digest)
    workload = c.typed(manifest, "workload", "workload", dict, "an object", required=False)
    if workload is not None:
        c.typed(workload, "rootPID", "workload.rootPID", int, "a PID (integer)", required=False)
        c.list_of(workload, "pids", "workload.pids", int, "PIDs (integers)")
        c.list_of(workload, "stdio", "workload.stdio", str, "strings")
        c.typed(workload, "namespace", "workload.namespace", str, "a namespace name", required=False)
        c.list_of(workload, "rereadAfterRestore", "workload.rereadAfterRestore", str, "absolute paths")
    recorded = c.typed(manifest, "criu", "criu", dict, "an object", required=False)
    if recorded is not None:
        mounts = c.typed(recorded, "externalMounts", "criu.externalMounts", dict, "an object", required=False) or {}
        for mountpoint, key in mounts.items():
            if not isinstance(key, str):
                c.fail(f"criu.externalMounts[{mountpoint!r}]", "a string", key)
