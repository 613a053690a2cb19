"""Reading a restored worker's declared files into the page cache, as its container sees them: named
files and directories are read whole, and nothing outside the container's root is ever opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dynamo_snapshot.agent.artifact.prefetch import Prefetch
from dynamo_snapshot.agent.container import control
from dynamo_snapshot.agent.host import confined


def write(path: Path, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return size


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def test_named_files_and_directories_are_read_whole(root: Path) -> None:
    expected = write(root / "models" / "a" / "model-00001.safetensors", 3 << 20)
    expected += write(root / "models" / "a" / "model-00002.safetensors", (1 << 20) + 7)
    expected += write(root / "models" / "a" / "nested" / "config.json", 100)
    expected += write(root / "tokenizer.json", 5000)
    # the Hugging Face cache layout: relative symlinks from snapshots/ to blobs/, followed inside the root
    expected += write(root / "hub" / "blobs" / "abc", 2 << 20)
    (root / "hub" / "snapshots" / "rev").mkdir(parents=True)
    (root / "hub" / "snapshots" / "rev" / "weights.bin").symlink_to("../../blobs/abc")
    result = Prefetch(["/models/a", "/tokenizer.json", "/hub/snapshots"], threads=3, chunk=1 << 20, root=root)
    outcome = result.start().wait(timeout=30)
    assert outcome.errors == ()
    assert outcome.bytes_read == expected


def test_nothing_outside_the_root_is_read(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.bin"
    write(secret, 1 << 20)
    (root / "etc").mkdir()
    (root / "absolute").symlink_to(secret)  # a container's absolute symlink means the container's path
    (root / "climbing").symlink_to("../host-secret.bin")  # '..' stops at the container's root
    (root / "etc" / "proc-root").symlink_to("/proc/self/root" + str(secret))  # no magic links either
    result = Prefetch(["/absolute", "/climbing", "/../host-secret.bin", "/etc/proc-root"], root=root)
    outcome = result.start().wait(timeout=30)
    assert outcome.bytes_read == 0
    assert len(outcome.errors) == 4


def test_a_fifo_or_a_missing_file_is_skipped_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe")
    expected = write(root / "weights.bin", 4096)
    outcome = Prefetch(["/pipe", "/gone", "/weights.bin"], root=root).start().wait(timeout=30)
    assert outcome.bytes_read == expected
    assert [e.split(":")[0] for e in outcome.errors] == ["/gone"]


def test_no_descriptor_is_left_open(root: Path) -> None:
    write(root / "w" / "one", 1 << 20)
    write(root / "w" / "two", 1 << 20)
    before = len(os.listdir("/proc/self/fd"))
    Prefetch(["/w"], threads=2, root=root).start().wait(timeout=30)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize(
    ("content", "declared"),
    [
        (b"", []),
        (b"1764325200.123\n", []),  # what workers wrote before the declaration existed
        (b"ready\n", []),
        (b'{"readyAt": 1.0}', []),
        (b'{"rereadAfterRestore": ["/models/llama", "/tok.json"]}', ["/models/llama", "/tok.json"]),
    ],
)
def test_what_a_worker_declares_in_ready_for_snapshot(content: bytes, declared: list[str]) -> None:
    assert control.parse_reread_declaration(content, "ready-for-snapshot") == declared


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"rereadAfterRestore": "/models"}', r"rereadAfterRestore must be a list of absolute paths, not str"),
        (b'{"rereadAfterRestore": ["models/llama"]}', r"rereadAfterRestore\[0\] = 'models/llama' is not an absolute"),
        (b'{"rereadAfterRestore": ["/a", 7]}', r"rereadAfterRestore\[1\] = 7 is not an absolute path"),
        (b'{"rereadAfterRestore": [' + b",".join([b'"/a"'] * 1025) + b"]}", r"1025 paths, at most 1024"),
    ],
)
def test_a_malformed_declaration_is_refused_naming_the_field(content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        control.parse_reread_declaration(content, "ready-for-snapshot")


def test_a_control_file_is_read_inside_the_root_only(root: Path, tmp_path: Path) -> None:
    (root / "ctl").mkdir()
    (root / "ctl" / "ready-for-snapshot").write_bytes(b'{"readyAt": 1}')
    assert confined.read_small(root, "/ctl/ready-for-snapshot", 1024) == b'{"readyAt": 1}'
    assert confined.read_small(root, "/ctl/restore-complete", 1024) is None
    (tmp_path / "host-file").write_bytes(b"host")
    (root / "ctl" / "escape").symlink_to(tmp_path / "host-file")  # resolves to <root>/<tmp>/host-file
    assert confined.read_small(root, "/ctl/escape", 1024) is None
    os.mkfifo(root / "ctl" / "fifo")
    with pytest.raises(ValueError, match="is not a regular file"):
        confined.read_small(root, "/ctl/fifo", 1024)
    with pytest.raises(ValueError, match="larger than 4 bytes"):
        confined.read_small(root, "/ctl/ready-for-snapshot", 4)
