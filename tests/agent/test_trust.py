"""The agent trusts no checkpoint it did not write and no image that holds more than its placeholder:
real CRIU dumps of a host process (``tree``), real ``/proc``; docs/security.md."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.artifact import authn, layout
from dynamo_snapshot.agent.artifact import manifest as artifact
from dynamo_snapshot.agent.container import criu, privilege
from dynamo_snapshot.agent.errors import ArtifactInvalid, RestoreError
from tests.agent import test_tree_restore

bundle = test_tree_restore.bundle  # the CRIU bundle, or a skip with the reason
SLEEPER = "import time\nwhile True: time.sleep(0.05)\n"


def _spawn(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def dumped(bundle: criu.CriuBundle, tmp_path: Path) -> Iterator[tuple[Path, str, privilege.Creds, authn.Keyring]]:
    """A real dump of a small process signed by key ``k1``: (version directory, its source's status creds)."""
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    keys = tmp_path / "keys"
    authn.create_key(keys, "k1")
    keyring = authn.Keyring.from_directory(keys)
    proc = _spawn([sys.executable, "-c", SLEEPER])
    try:
        status = privilege.status_creds(Path(f"/proc/{proc.pid}/status").read_text())
        settings = criu.CriuSettings(network_lock="skip")
        stored = anyio.run(
            lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "c1", bundle, settings=settings, keyring=keyring)
        )
    finally:
        _stop(proc)
    yield stored.directory, stored.manifest[authn.KEY_FIELD], status, keyring


def _here(directory: Path) -> artifact.Compatibility:
    return artifact.Compatibility.from_json(json.loads((directory / layout.MANIFEST).read_text())["compatibility"])


def test_a_checkpoint_names_its_key_and_verifies_with_it(dumped) -> None:
    directory, key_id, _, keyring = dumped
    assert key_id == "k1"
    assert (directory / authn.MAC_FILE).read_text().startswith("hmac-sha256 k1 ")
    assert authn.verify_listing(directory, "c1", _here(directory), keyring)["checkpointID"] == "c1"


def test_an_image_changed_and_its_digests_recomputed_is_refused_without_the_key(dumped) -> None:
    directory, _, _, keyring = dumped
    core = next(directory.glob("core-*.img"))
    data = bytearray(core.read_bytes())
    data[-1] ^= 0x01
    core.write_bytes(bytes(data))
    recorded = json.loads((directory / layout.MANIFEST).read_text())
    artifact.write_manifest(directory, {k: v for k, v in recorded.items() if k not in ("files", "formatVersion")})
    with pytest.raises(ArtifactInvalid, match=r"does not match its manifest\.json\.mac"):
        authn.verify_listing(directory, "c1", _here(directory), keyring)


def test_a_checkpoint_without_a_mac_is_refused_with_the_fix(dumped, tmp_path: Path) -> None:
    directory, _, _, keyring = dumped
    (directory / authn.MAC_FILE).unlink()
    with pytest.raises(ArtifactInvalid, match="take the checkpoint again"):
        anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "c1", criu.CriuBundle.locate(), keyring=keyring))


def test_a_rotated_keyring_still_verifies_old_checkpoints_and_signs_with_the_newest(dumped, tmp_path: Path) -> None:
    directory = dumped[0]
    authn.create_key(tmp_path / "keys", "k2")
    rotated = authn.Keyring.from_directory(tmp_path / "keys")
    assert rotated.signing_id == "k2"
    assert authn.verify_listing(directory, "c1", _here(directory), rotated)["keyID"] == "k1"
    (tmp_path / "keys" / "k1").unlink()
    with pytest.raises(ArtifactInvalid, match="names key 'k1', which this agent does not have"):
        authn.verify_listing(directory, "c1", _here(directory), authn.Keyring.from_directory(tmp_path / "keys"))


def test_an_oversized_or_symlinked_manifest_is_refused_before_it_is_parsed(dumped, tmp_path: Path) -> None:
    directory, _, _, keyring = dumped
    manifest = directory / layout.MANIFEST
    saved = manifest.read_bytes()
    manifest.write_bytes(b" " * (authn.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ArtifactInvalid, match="larger than the 16777216 bytes"):
        authn.open_manifest(directory, keyring)
    (tmp_path / "elsewhere.json").write_bytes(saved)
    manifest.unlink()
    manifest.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ArtifactInvalid, match="without following a link"):
        authn.open_manifest(directory, keyring)


def test_core_images_decode_to_the_credentials_the_process_had(dumped) -> None:
    directory, _, status, _ = dumped
    cores = sorted(directory.glob("core-*.img"))
    assert cores
    for core in cores:
        assert privilege.core_creds(core.read_bytes()) == status


def test_a_restore_into_a_less_privileged_placeholder_is_refused(dumped) -> None:
    directory, _, _, _ = dumped
    same = _spawn([sys.executable, "-c", SLEEPER])
    dropped = _spawn(["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                      sys.executable, "-c", SLEEPER])
    try:
        assert privilege.check_images(directory, same.pid) >= 1  # as privileged as the dumped process
        with pytest.raises(RestoreError) as refused:
            privilege.check_images(directory, dropped.pid)
        message = str(refused.value)
        assert "permitted capabilities" in message and "bounding capabilities" in message
        assert "no_new_privs 0 (the placeholder has 1)" in message
    finally:
        _stop(same)
        _stop(dropped)


def test_privilege_comparison_allows_only_what_the_placeholder_holds() -> None:
    base = privilege.Creds((1000,) * 4, (1000,) * 4, (), 0, 0, 0, 0xFFFF, 0, True, 2)
    assert privilege.excess(base, base) == []
    root = privilege.Creds((0,) * 4, (0,) * 4, (0,), 0, 1 << 21, 1 << 21, 0xFFFF, 0, False, 0)
    problems = privilege.excess(root, base)
    assert any("user IDs [0]" in p for p in problems)
    assert any("group IDs [0]" in p for p in problems)
    assert any("effective capabilities" in p for p in problems)
    assert "no_new_privs 0 (the placeholder has 1)" in problems
    assert "seccomp mode 0 (the placeholder's is 2)" in problems


def test_a_keyring_refuses_short_keys_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(authn.KeyringError, match="does not exist"):
        authn.Keyring.from_directory(tmp_path / "none")
    (tmp_path / "short").write_text("abc")
    with pytest.raises(authn.KeyringError, match="'short' is 3 bytes"):
        authn.Keyring.from_directory(tmp_path)
