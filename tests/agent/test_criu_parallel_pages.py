"""The patched CRIU (images/criu/patches/0001-dynamo-parallel-pages.patch, built by hack/build-criu.sh)
restores a process tree's private anonymous memory with parallel readers: the memory comes back byte
for byte - random data, a never-touched hole and a read-only region - and CRIU's restore log says the
parallel path ran; with huge pages forced (the agent's ``criu.restoreHugePages``) the memory is restored in
huge pages, which survive the restorer's move to the final address (0002-dynamo-thp-alignment.patch).
Skipped where the patched CRIU is not built (or not root)."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from dynamo_snapshot.agent import tree
from dynamo_snapshot.agent.container import criu
from tests.agent.test_tree_restore import gone

PATCHED = criu.cache_dir({k: v for k, v in os.environ.items() if k != criu.PATCHES_ENV}) / "bundle"

# 512 MiB of random private anonymous memory with a 64 MiB hole never touched in the middle, and a
# 16 MiB region made read-only after it is filled. Each request N (the file "req") is answered with the
# sha256 of all of it in "sum.N"; "ready" says the memory is in place.
HOLDER = """
import ctypes, hashlib, mmap, os, sys, time
MB = 1 << 20
d = sys.argv[1]
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
big = mmap.mmap(-1, 512 * MB, flags=flags)
for off in range(0, 512 * MB, 8 * MB):
    if not 256 * MB <= off < 320 * MB:
        big[off:off + 8 * MB] = os.urandom(8 * MB)
ro = mmap.mmap(-1, 16 * MB, flags=flags)
ro[:] = os.urandom(16 * MB)
addr = ctypes.addressof(ctypes.c_char.from_buffer(ro))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(addr, 16 * MB, mmap.PROT_READ) == 0, ctypes.get_errno()
open(os.path.join(d, "ready"), "w").close()
done = 0
while True:
    try:
        n = int(open(os.path.join(d, "req")).read() or 0)
    except FileNotFoundError:
        n = 0
    if n > done:
        h = hashlib.sha256(big)
        h.update(ro)
        with open(os.path.join(d, "sum.tmp"), "w") as f:
            f.write(h.hexdigest())
        os.rename(os.path.join(d, "sum.tmp"), os.path.join(d, f"sum.{n}"))
        done = n
    time.sleep(0.01)
"""


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CRIU)"
    if not (PATCHED / ".complete").is_file():
        return f"the patched CRIU is not built at {PATCHED} (run hack/build-criu.sh)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def wait_for(path: Path, timeout: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)
    return path


def checksum(state: Path, n: int) -> str:
    (state / "req.tmp").write_text(str(n))
    (state / "req.tmp").rename(state / "req")
    return wait_for(state / f"sum.{n}").read_text()


def test_parallel_page_restore_brings_back_memory_with_a_hole_and_a_read_only_region_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DYNAMO_CRIU_RESTORE_THREADS", "2")
    bundle = criu.CriuBundle(PATCHED)
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: the restored tree comes back to us
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state)], start_new_session=True,
                            stdin=subprocess.DEVNULL)
    wait_for(state / "ready")
    before = checksum(state, 1)
    settings = criu.CriuSettings(network_lock="skip")
    anyio.run(lambda: tree.checkpoint_tree(proc.pid, tmp_path / "ck", "mem", bundle, settings=settings))
    gone(proc.pid)
    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "mem", bundle, settings=settings))
    try:
        assert checksum(state, 2) == before
        logged = re.search(r"dynamo parallel page restore: (\d+) bytes .* by (\d+) threads",
                           restored.log_path.read_text())
        assert logged, f"no parallel page restore line in {restored.log_path}"
        assert int(logged.group(1)) >= (512 - 64 + 16) << 20 and logged.group(2) == "2"
    finally:
        gone(restored.pid)

    # the agent's criu.restoreHugePages: force reaches CRIU, and the huge pages survive the restorer (0002)
    forced = criu.CriuSettings(network_lock="skip", restore_huge_pages="force")
    restored = anyio.run(lambda: tree.restore_tree(tmp_path / "ck", "mem", bundle, settings=forced))
    try:
        assert checksum(state, 3) == before
        assert anon_huge_mib(restored.pid) >= 256
    finally:
        gone(restored.pid)


def anon_huge_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) >> 10
    return 0
