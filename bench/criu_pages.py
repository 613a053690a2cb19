#!/usr/bin/env python3
"""Measures CRIU's page restore on this CPU machine: stock against the patched parallel page restore
(images/criu/patches/0001-dynamo-parallel-pages.patch), with the image in the page cache.

    sudo .venv/bin/python bench/criu_pages.py [--gib 2] [--repeat 5] [--threads 2] [--dir DIR]

Stages: (1) start a process holding --gib GiB of private anonymous memory (one run plain, one with
MADV_HUGEPAGE on it), (2) ``criu dump`` it once, (3) ``criu restore -d`` the same image --repeat times
per configuration, the configurations taking turns, the page image read into the page cache before
each restore and the restored process killed after it, and (4) print one row per workload and
configuration: the median and the best wall time of ``criu restore``, and the patch's own log line of
the median run (bytes, threads, ms of the parallel fill) with how much of the restored memory is in
huge pages (``AnonHugePages``: 0002-dynamo-thp-alignment.patch keeps them through the restorer's
mremap). Configurations: the stock binary (hack/build-criu.sh with CRIU_PATCHES=none, when built),
the patched binary with DYNAMO_CRIU_RESTORE_THREADS=0 (its stock path), 1 and --threads readers,
and --threads readers with DYNAMO_CRIU_RESTORE_THP=force. Needs root and the patched CRIU (hack/build-criu.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamo_snapshot.agent.container import criu  # noqa: E402

# Holds GiB of private anonymous memory (MADV_HUGEPAGE on it with "huge"), then says so and waits.
HOLDER = """
import mmap, os, sys, time
size = int(sys.argv[1]) << 30
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if sys.argv[2] == "huge":
    m.madvise(mmap.MADV_HUGEPAGE)
block = bytearray(os.urandom(64 << 20))
for off in range(0, size, len(block)):
    block[:8] = off.to_bytes(8, "little")
    m[off:off + len(block)] = block
open(sys.argv[3], "w").close()
while True:
    time.sleep(1)
"""
LOGGED = re.compile(r"dynamo parallel page restore: (\d+) bytes .* by (\d+) threads in (\d+) ms")


@dataclass(frozen=True)
class Config:
    name: str
    bundle: criu.CriuBundle
    env: dict[str, str]


def wait_gone(pid: int) -> None:
    """Reaps ``pid`` (a child or, as subreaper, an orphaned restored process) once it has died."""
    while True:
        try:
            if os.waitpid(pid, 0)[0] == pid:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.01)


def run_criu(bundle: criu.CriuBundle, args: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    result = subprocess.run([*bundle.command(), *args], env={**os.environ, **(env or {})},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"criu {args[0]} failed ({result.returncode}): {result.stderr[-2000:]}")
    return time.monotonic() - started


def dump(bundle: criu.CriuBundle, gib: int, kind: str, images: Path) -> int:
    images.mkdir(parents=True)
    ready = images.parent / f"{kind}.ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(gib), kind, str(ready)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} memory holder exited with {proc.returncode}")
        time.sleep(0.05)
    run_criu(bundle, ["dump", "-t", str(proc.pid), "-D", str(images), "-v4", "-o", "dump.log"])
    wait_gone(proc.pid)
    return proc.pid


def warm(images: Path) -> None:
    """Reads the page image, so that it is in the page cache (as after a fresh dump) even where the
    kernel has dropped some of it since."""
    for page_image in images.glob("pages-*.img"):
        with open(page_image, "rb") as f:
            while f.read(64 << 20):
                pass


def restore(config: Config, images: Path, pid: int, run: int) -> tuple[float, str]:
    log = f"restore-{config.name.replace(' ', '_')}-{run}.log"
    warm(images)
    seconds = run_criu(config.bundle, ["restore", "-d", "-D", str(images), "-v4", "-o", log], config.env)
    huge = huge_mib(pid)
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    match = LOGGED.search((images / log).read_text())
    if not match:
        return seconds, f"stock path; {huge} MiB in huge pages after it"
    nbytes, threads, ms = (int(g) for g in match.groups())
    rate = nbytes / 1e3 / ms if ms else float("inf")
    return seconds, f"{nbytes >> 20} MiB by {threads} threads in {ms} ms ({rate:.0f} MB/s); {huge} MiB in huge pages"


def huge_mib(pid: int) -> int:
    """The restored process's anonymous memory in transparent huge pages (smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) >> 10
    return 0


def configs(threads: int) -> list[Config]:
    patched = criu.CriuBundle(criu.cache_dir({k: v for k, v in os.environ.items() if k != criu.PATCHES_ENV})
                              / "bundle")
    stock = criu.cache_dir({**os.environ, criu.PATCHES_ENV: "none"}) / "bundle"
    out = [Config("stock binary", criu.CriuBundle(stock), {})] if (stock / ".complete").is_file() else []
    return [
        *out,
        Config("patched threads=0", patched, {"DYNAMO_CRIU_RESTORE_THREADS": "0"}),
        Config("patched threads=1", patched, {"DYNAMO_CRIU_RESTORE_THREADS": "1"}),
        Config(f"patched threads={threads}", patched, {"DYNAMO_CRIU_RESTORE_THREADS": str(threads)}),
        Config(f"patched threads={threads} thp=force", patched,
               {"DYNAMO_CRIU_RESTORE_THREADS": str(threads), "DYNAMO_CRIU_RESTORE_THP": "force"}),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="where images and CRIU logs go, kept (default: a temporary one)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (CRIU)")
    table = configs(args.threads)
    if not (table[-1].bundle.path / ".complete").is_file():
        raise SystemExit(f"the patched CRIU is not built at {table[-1].bundle.path} (run hack/build-criu.sh)")
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: restored processes come back to us
    with contextlib.nullcontext(str(args.dir)) if args.dir else tempfile.TemporaryDirectory() as tmp:
        print(f"{args.gib} GiB private anonymous memory, image in the page cache, median of {args.repeat}")
        print(f"{'workload':<14} {'configuration':<26} {'restore s':>9} {'best':>6}  parallel fill (criu log)")
        for kind in ("plain", "huge"):
            images = Path(tmp) / kind
            pid = dump(table[-1].bundle, args.gib, kind, images)
            label = "plain" if kind == "plain" else "MADV_HUGEPAGE"
            # round-robin over the configurations, so that a change of load on the machine hits all alike
            runs: dict[str, list[tuple[float, str]]] = {c.name: [] for c in table}
            for r in range(args.repeat):
                for config in table:
                    runs[config.name].append(restore(config, images, pid, r))
            for config in table:
                times = [s for s, _ in runs[config.name]]
                fill = statistics.median_low(runs[config.name])[1]
                print(f"{label:<14} {config.name:<26} {statistics.median(times):>9.2f} {min(times):>6.2f}  {fill}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
