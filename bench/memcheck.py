"""How fast a restore can check page data in a process's memory (``agent/artifact/memcheck.py``).

A child process holds ``--gib`` GiB of anonymous memory. N threads read its largest mapping in 64 MiB
chunks: ``proc_mem`` through ``/proc/<pid>/mem`` in 4 MiB reads (with and without SHA-256), ``check``
as the restore's check does (``memcheck.chunk_digest``: batched ``process_vm_readv``, SHA-256), over
runs of ``--span-pages`` pages with as many left out between them (a fragmented heap: CRIU's pagemap
has one entry per run; 0 = one run); and the SHA-256 of a buffer alone. Prints GB/s of checked bytes.

    sudo .venv/bin/python bench/memcheck.py --gib 4 --threads 1,2,16 --span-pages 0,1,16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_snapshot.agent.artifact import memcheck
from dynamo_snapshot.agent.container import memimages

CHUNK = 64 << 20
HOLDER = """
import sys, time
block = bytearray(range(256)) * (4 << 12)
heap = block * ((int(sys.argv[1]) << 30) // len(block))
print("ready", flush=True)
time.sleep(3600)
"""


def largest_mapping(pid: int) -> tuple[int, int]:
    ranges = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        ranges.append((lo, hi))
    return max(ranges, key=lambda r: r[1] - r[0])


class _Sink:
    def update(self, data: object) -> None:
        return None


def proc_mem(pid: int, start: int, end: int, threads: int, digest: bool) -> float:
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    chunks = [(a, min(CHUNK, end - a)) for a in range(start, end, CHUNK)]

    def one(chunk: tuple[int, int]) -> None:
        h = hashlib.sha256() if digest else _Sink()
        memcheck._reader().feed(h, mem, chunk[0], chunk[1], lambda: "bench")

    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, chunks))
    os.close(mem)
    return (end - start) / (time.monotonic() - began) / 1e9


def check(pid: int, start: int, end: int, threads: int, span_pages: int) -> float:
    page = memimages.PAGE_SIZE
    step = span_pages * page
    spans = ([memimages.Span(a, min(step, end - a)) for a in range(start, end, 2 * step)] if span_pages
             else [memimages.Span(start, end - start)])
    process = memimages.ProcessPages(1, "pages-1.img", tuple(spans), ())
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    chunks = [(a, min(CHUNK, process.size - a)) for a in range(0, process.size, CHUNK)]
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda c: memcheck.chunk_digest(process, pid, mem, -1, c[0], c[1]), chunks))
    os.close(mem)
    return process.size / (time.monotonic() - began) / 1e9


def hash_only(threads: int, gib: int) -> float:
    block = bytes(CHUNK)
    count = max(threads, (gib << 30) // CHUNK)
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda _: hashlib.sha256(block).digest(), range(count)))
    return count * CHUNK / (time.monotonic() - began) / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, default=4)
    parser.add_argument("--threads", default="1,2,4,8,16")
    parser.add_argument("--span-pages", default="0,1,16")
    args = parser.parse_args()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.gib)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        start, end = largest_mapping(holder.pid)
        results = []
        for threads in (int(t) for t in args.threads.split(",")):
            row = {"threads": threads, "sha256_only_gbps": round(hash_only(threads, args.gib), 2)}
            for digest in (False, True):
                row[f"proc_mem{'+sha256' if digest else ''}_gbps"] = round(
                    proc_mem(holder.pid, start, end, threads, digest), 2)
            for pages in (int(p) for p in args.span_pages.split(",")):
                row[f"check_spans_{pages or 'one'}_gbps"] = round(check(holder.pid, start, end, threads, pages), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
        print(f"{(end - start) / 1e9:.2f} GB mapping; cpus {os.cpu_count()}")
    finally:
        holder.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
