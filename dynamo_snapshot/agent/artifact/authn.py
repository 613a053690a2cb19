"""Authenticated checkpoints: only an agent holding a checkpoint key can write a manifest a restore accepts.

    keyring   the key directory (a Secret in the agent's namespace, mounted only into the agent): one
              file per key, its name the key ID, its content the key (at least 32 bytes); the key ID
              greatest in sort order signs (name them ``k2026-12-02``, say), every key verifies, so a
              key is rotated by adding a newer one and removed once no checkpoint needs it
    seal      at the manifest stage of a checkpoint: ``manifest.json`` already carries every file's
              size and digests and the signing key's ID (``keyID``); ``manifest.json.mac`` gets
              ``hmac-sha256 <keyID> <hex>`` over its exact bytes, written atomically before promotion
    open      at the verify stage of a restore, before CRIU or the agent parses anything else: both
              files read below the version directory without following symlinks and bounded in size,
              the MAC checked in constant time, only then the JSON parsed (and its ``keyID`` compared
              with the MAC's); the parsed manifest is what the restore uses, never a second read; it
              carries the SHA-256 of the exact bytes authenticated (``sha256_of``), which a node-cache
              entry is bound to (``nodecache.py``)

A version without ``manifest.json.mac`` (written before checkpoints were authenticated, or stripped)
is refused with a message that says to take the checkpoint again (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.artifact import verification
from dynamo_snapshot.agent.errors import AgentError, ArtifactInvalid, ArtifactMissing, CheckpointError
from dynamo_snapshot.agent.host import confined
from dynamo_snapshot.api import names

MANIFEST = names.MANIFEST_FILE
MAC_FILE = names.MANIFEST_MAC_FILE
KEY_FIELD = names.MANIFEST_KEY_FIELD
ALGORITHM = "hmac-sha256"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest of a many-GiB checkpoint is tens of KiB
MAX_MAC_BYTES = 512
MAX_KEY_BYTES = 4096
MIN_KEY_BYTES = 32
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_KEY_DIRECTORY = "/etc/dynamo-snapshot/keys"
KEY_DIRECTORY_ENV = "DYN_SNAPSHOT_KEY_DIRECTORY"  # overrides the default (tests, the local stack)


class KeyringError(AgentError, ValueError):
    """The key directory is unusable (the agent does not start)."""


@dataclass(frozen=True)
class Keyring:
    keys: dict[str, bytes]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyringError("the keyring holds no key")
        for key_id, key in self.keys.items():
            if not _KEY_ID.match(key_id):
                raise KeyringError(f"key ID {key_id!r} must match {_KEY_ID.pattern}")
            if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
                raise KeyringError(f"key {key_id!r} is {len(key)} bytes; a key is {MIN_KEY_BYTES}-{MAX_KEY_BYTES}")

    @property
    def signing_id(self) -> str:
        return max(self.keys)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Keyring:
        """Every regular file of ``directory`` not starting with a dot (a mounted Secret's files are
        symlinks into its ``..data``; they are followed, the directory being the agent's own mount)."""
        path = Path(directory)
        try:
            entries = sorted(e for e in os.listdir(path) if not e.startswith("."))
        except FileNotFoundError:
            raise KeyringError(
                f"key directory {path} does not exist: mount the checkpoint key Secret there "
                "(the snapshot chart's agent.keys; docs/security.md)"
            ) from None
        except NotADirectoryError:
            raise KeyringError(f"key directory {path} is not a directory") from None
        keys = {}
        for name in entries:
            file = path / name
            if not stat.S_ISREG(file.stat().st_mode):
                continue
            with file.open("rb") as f:
                key = f.read(MAX_KEY_BYTES + 1).strip()
            keys[name] = key
        if not keys:
            raise KeyringError(f"key directory {path} holds no key file (docs/security.md says how to create one)")
        try:
            return cls(keys)
        except KeyringError as err:
            raise KeyringError(f"key directory {path}: {err}") from None

    def mac(self, key_id: str, data: bytes) -> str:
        return hmac.new(self.keys[key_id], data, hashlib.sha256).hexdigest()

    def mac_line(self, data: bytes) -> str:
        key_id = self.signing_id
        return f"{ALGORITHM} {key_id} {self.mac(key_id, data)}\n"


class AuthenticatedManifest(dict[str, Any]):
    """The parsed manifest ``open_manifest`` authenticated, with the SHA-256 of its exact bytes."""

    sha256: str = ""


def sha256_of(manifest: dict[str, Any]) -> str | None:
    """The SHA-256 of the bytes ``manifest`` was authenticated from; None for a manifest that was not."""
    return (manifest.sha256 or None) if isinstance(manifest, AuthenticatedManifest) else None


def _read_below(directory: Path, name: str, limit: int) -> bytes | None:
    """The regular file ``name`` directly in ``directory``, never through a symlink, at most ``limit``
    bytes (or ArtifactInvalid); None when it is not there."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactInvalid(f"{directory} cannot be opened as a directory: {exc.strerror}") from exc
    try:
        fd = confined.openat2(dir_fd, name, confined.BENEATH_NO_LINKS, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactInvalid(f"{directory / name} cannot be opened without following a link: {exc.strerror}") from exc
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ArtifactInvalid(f"{directory / name} is not a regular file")
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ArtifactInvalid(f"{directory / name} is larger than the {limit} bytes an agent reads")
        return b"".join(chunks)
    finally:
        os.close(fd)


def seal(directory: Path, keyring: Keyring) -> str:
    """Write ``manifest.json.mac`` for the manifest in ``directory`` (the staging one); returns the key ID."""
    data = _read_below(directory, MANIFEST, MAX_MANIFEST_BYTES)
    if data is None:
        raise CheckpointError(f"{directory / MANIFEST} is missing: nothing to authenticate")
    recorded = json.loads(data).get(KEY_FIELD)
    if recorded != keyring.signing_id:
        raise CheckpointError(
            f"{directory / MANIFEST} names key {recorded!r}, not the signing key {keyring.signing_id!r}"
        )
    tmp = directory / f".{MAC_FILE}.tmp"
    with tmp.open("w") as f:
        f.write(keyring.mac_line(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MAC_FILE)
    return keyring.signing_id


def _parse_mac(where: str, text: bytes) -> tuple[str, str]:
    where = f"{where}/{MAC_FILE}"
    try:
        algorithm, key_id, digest = text.decode("ascii").split()
    except (UnicodeDecodeError, ValueError):
        raise ArtifactInvalid(f"{where} is malformed: expected '{ALGORITHM} <key ID> <hex digest>'") from None
    if algorithm != ALGORITHM:
        raise ArtifactInvalid(f"{where} uses {algorithm!r}; this agent verifies {ALGORITHM}")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ArtifactInvalid(f"{where} has a malformed digest (expected 64 hex digits)")
    return key_id, digest


def open_manifest(directory: Path, keyring: Keyring) -> dict[str, Any]:
    """The authenticated manifest of the version ``directory``, or ArtifactInvalid naming what is wrong."""
    mac = _read_below(directory, MAC_FILE, MAX_MAC_BYTES)
    data = _read_below(directory, MANIFEST, MAX_MANIFEST_BYTES)
    return authenticate(data, mac, keyring, str(directory))


def authenticate(data: bytes | None, mac: bytes | None, keyring: Keyring, where: str) -> AuthenticatedManifest:
    """The manifest of the bytes ``data`` checked against the MAC file's bytes ``mac`` (None: either is
    missing); ``where`` names the version's directory (or its object prefix) in errors."""
    if data is None:
        raise ArtifactMissing(f"{where}/{MANIFEST} is missing: the checkpoint was never completed")
    if mac is None:
        raise ArtifactInvalid(
            f"{where} has no {MAC_FILE}: it was written before checkpoints were authenticated, or "
            "someone removed it; it is not restored - take the checkpoint again (delete the "
            "DynamoCheckpoint and its directory, or raise its artifactVersion)"
        )
    key_id, digest = _parse_mac(where, mac)
    if key_id not in keyring.keys:
        raise ArtifactInvalid(
            f"{where}/{MAC_FILE} names key {key_id!r}, which this agent does not have (it has "
            f"{', '.join(sorted(keyring.keys))}): keep retired keys in the key Secret while checkpoints use them"
        )
    if not hmac.compare_digest(keyring.mac(key_id, data), digest):
        raise ArtifactInvalid(
            f"{where}/{MANIFEST} does not match its {MAC_FILE} (key {key_id!r}): it was not written "
            "by an agent holding the key, or was changed since; it is not restored"
        )
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactInvalid(f"{where}/{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactInvalid(f"{where}/{MANIFEST} is not a JSON object")
    if manifest.get(KEY_FIELD) != key_id:
        raise ArtifactInvalid(
            f"{where}/{MANIFEST} field {KEY_FIELD} is {manifest.get(KEY_FIELD)!r}, but its MAC is by key {key_id!r}"
        )
    authenticated = AuthenticatedManifest(manifest)
    authenticated.sha256 = hashlib.sha256(data).hexdigest()
    return authenticated


def write_manifest(
    staging: Path, fields: dict[str, Any], keyring: Keyring, io_threads: int | None = None,
    hashed: Mapping[str, artifact.Hashed] | None = None,
) -> dict[str, Any]:
    """The checkpoint's manifest stage: ``manifest.json`` naming the signing key, then its MAC.
    ``hashed``: digests computed during the dump (``artifact.write_manifest``)."""
    written = artifact.write_manifest(staging, {**fields, KEY_FIELD: keyring.signing_id}, io_threads,
                                      hashed=hashed)
    seal(staging, keyring)
    return written


def verify_listing(directory: Path, checkpoint_id: str, here: Any, keyring: Keyring) -> dict[str, Any]:
    """The restore's verify stage, first step: the authenticated manifest, then every check of
    ``manifest.verify_listing`` on it (checkpoint ID, compatibility, each file's size, nothing unlisted)."""
    return verification.verify_listing(directory, checkpoint_id, here, manifest=open_manifest(directory, keyring))


def default_keyring() -> Keyring:
    """The keyring of ``DYN_SNAPSHOT_KEY_DIRECTORY``, else of the default directory."""
    return Keyring.from_directory(os.environ.get(KEY_DIRECTORY_ENV, DEFAULT_KEY_DIRECTORY))


def create_key(directory: str | Path, key_id: str) -> Path:
    """A new random key file ``key_id`` in ``directory`` (mode 0600): what ``snapshot`` chart's
    Secret holds, for the local stack and tests."""
    import secrets

    Keyring({key_id: b"x" * MIN_KEY_BYTES})  # the ID is valid
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    file = path / key_id
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return file
