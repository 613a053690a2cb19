"""GPU benchmark: cold start of a stand-in inference worker versus checkpoint/restore with the
project's own pipeline (``dynamo_snapshot.agent.tree``: CUDA driver checkpoint + CRIU + verified
artifact), with each restore optimisation measured on its own. Run as root on a GPU machine; see
bench/gpu/README.md for the command and what each row means.

Flow (one worker, several checkpoints of it, then the restores, page cache dropped before each):

    weights   generate the safetensors file; pinned H2D bandwidth; storage read bandwidth
    cold      start the worker with empty compile caches, page cache dropped: time to ready
    helpers   the agent's refusal of processes holding NVIDIA mappings without CUDA (before any lock)
    ckpt A    stock: helpers stopped (needed at all), nothing else
    ckpt B    + allocator caches freed (torch.cuda.empty_cache, pinned host cache)
    ckpt C    + weights' device memory released (re-read from the safetensors file after restore)
    restores  A/1 reader (stock), B/1 reader, B/16 readers (parallel verify = prefetch),
              C/16 readers + weights prefetched + reloaded by the worker
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import anyio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dynamo_snapshot.agent import tree  # noqa: E402
from dynamo_snapshot.agent.container import criu  # noqa: E402
from dynamo_snapshot.agent.cuda import devices as cuda_devices  # noqa: E402
from dynamo_snapshot.agent.cuda.driver import load_driver  # noqa: E402
from dynamo_snapshot.agent.cuda.driverstep import CudaHelperProcesses, DriverCuda  # noqa: E402
from dynamo_snapshot.agent.host import procfs  # noqa: E402

HERE = Path(__file__).resolve().parent
PORT = 47611


def log(msg: str, **fields: Any) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg} {json.dumps(fields) if fields else ''}", flush=True)


def become_subreaper() -> None:
    """Restored trees are re-parented to us when CRIU exits, so we can reap them (and free their PIDs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def drop_caches(files: list[Path]) -> str:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for path in files:  # fallback: evict the files we read (clean pages only, hence the sync)
        for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    return "fadvise"


def read_bandwidth(path: Path, nbytes: int, threads: int, chunk: int, direct: bool = False) -> float:
    """GB/s reading ``nbytes`` of ``path`` with ``threads`` readers (1 = one sequential stream);
    ``direct`` bypasses the page cache (O_DIRECT, page-aligned buffers)."""
    import mmap
    import threading

    size = min(nbytes, path.stat().st_size) // 4096 * 4096
    counter = iter(range(0, size, chunk))
    lock = threading.Lock()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))

    def reader() -> None:
        buf = memoryview(mmap.mmap(-1, chunk))
        while True:
            with lock:
                offset = next(counter, None)
            if offset is None:
                return
            os.preadv(fd, [buf[: min(chunk, size - offset)]], offset)

    started = time.perf_counter()
    pool = [threading.Thread(target=reader) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)
    return size / (time.perf_counter() - started) / 1e9


def request(payload: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as conn:
        conn.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(f"worker: {payload.get('cmd')}: {reply.get('error')}")
    return reply


def wait_ready(proc: subprocess.Popen | None, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before it was ready")
        try:
            return request({"cmd": "ping"}, timeout=5)
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"worker not ready after {timeout} s")


def kill_and_reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(500):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                break
        if not procfs.proc(pid).exists():
            break
        time.sleep(0.01)


def compressibility(paths: list[Path], samples: int = 64, size: int = 1 << 20) -> dict[str, float]:
    """Of ``samples`` evenly spread 1 MiB pieces: uncompressed/compressed size (zlib level 1) and the
    share of 4 KiB pages that are all zeros. Would compressing the page images pay on this storage?"""
    import zlib

    raw = packed = pages = zero = 0
    empty = bytes(4096)
    for path in paths:
        total = path.stat().st_size
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(total * i // samples // 4096 * 4096)
                piece = f.read(size)
                raw += len(piece)
                packed += len(zlib.compress(piece, 1))
                for at in range(0, len(piece) - 4095, 4096):
                    pages += 1
                    zero += piece[at : at + 4096] == empty
    return {"zlib1_ratio": raw / packed if packed else 1.0, "zero_page_share": zero / pages if pages else 0.0}


def compression_probe(pages: list[Path], scratch: Path, threads: int = 16, chunk: int = 8 << 20) -> dict[str, float]:
    """What compressed page images would cost and save: compress every page image in chunks (zlib 1,
    in parallel) to ``scratch``; then, page cache dropped, read and decompress them in parallel into
    /dev/shm (where CRIU would read them). Not part of the pipeline: a measurement."""
    import threading
    import zlib

    jobs = [(path, offset) for path in pages for offset in range(0, path.stat().st_size, chunk)]
    packed: dict[int, bytes] = {}
    lock = threading.Lock()
    feed = iter(enumerate(jobs))

    def squeeze() -> None:
        while True:
            with lock:
                item = next(feed, None)
            if item is None:
                return
            i, (path, offset) = item
            with open(path, "rb") as f:
                f.seek(offset)
                data = zlib.compress(f.read(chunk), 1)
            with lock:
                packed[i] = data

    started = time.perf_counter()
    pool = [threading.Thread(target=squeeze) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    index, offset = [], 0
    with open(scratch, "wb") as out:
        for i in range(len(jobs)):
            out.write(packed[i])
            index.append((offset, len(packed[i])))
            offset += len(packed[i])
        out.flush()
        os.fsync(out.fileno())
    compress_s = time.perf_counter() - started
    raw = sum(p.stat().st_size for p in pages)
    packed.clear()
    drop_caches([scratch])
    target = Path("/dev/shm/dynamo-snapshot-bench-pages")
    fd_out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fd_in = os.open(scratch, os.O_RDONLY)
    feed2 = iter(enumerate(index))

    def expand() -> None:
        while True:
            with lock:
                item = next(feed2, None)
            if item is None:
                return
            i, (at, length) = item
            os.pwrite(fd_out, zlib.decompress(os.pread(fd_in, length, at)), i * chunk)

    started = time.perf_counter()
    pool = [threading.Thread(target=expand) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    expand_s = time.perf_counter() - started
    os.close(fd_in)
    os.close(fd_out)
    target.unlink()
    scratch.unlink()
    return {"raw_bytes": raw, "compressed_bytes": offset, "compress_s": compress_s, "read_and_expand_s": expand_s}


def tree_tasks(pid: int) -> list[int]:
    return sorted({t for p in procfs.process_tree(pid) for t in procfs.threads(p)})


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = args.work
        self.out = args.out
        self.base = self.work / "checkpoints"
        self.weights = self.work / "weights.safetensors"
        self.logs = self.work / "logs"
        self.results: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}}
        self.bundle = criu.CriuBundle.locate()
        self.settings = criu.CriuSettings(network_lock=args.network_lock)
        self.worker: subprocess.Popen | None = None
        self.worker_pid: int | None = None

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def env(self) -> dict[str, Any]:
        driver = load_driver()
        gpus = cuda_devices.gpus()
        usage = shutil.disk_usage(self.work)
        info = {
            "driver_version": cuda_devices.driver_version(),
            "gpus": [g.to_json() for g in gpus],
            "checkpoint_api": driver.name,
            "criu": self.bundle.version(),
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "disk_free_gb": round(usage.free / 1e9, 1),
            "network_lock": self.settings.network_lock,
        }
        self.results["env"] = info
        log("environment", **info)
        return info

    def prepare_weights(self) -> None:
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(HERE / "weights.py"), "--out", str(self.weights), "--gib", str(self.args.weights_gib)],
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        info["generate_s"] = round(time.perf_counter() - started, 1)
        self.results["weights"] = info
        log("weights", **info)
        size = self.weights.stat().st_size
        bw = {}
        bw["drop_caches"] = drop_caches([self.weights])
        bw["parallel_read_gbps"] = read_bandwidth(self.weights, size, 16, 16 << 20)
        bw["drop_caches_2"] = drop_caches([self.weights])
        bw["sequential_read_gbps"] = read_bandwidth(self.weights, min(size, 4 << 30), 1, 4 << 20)
        bw["drop_caches_3"] = drop_caches([self.weights])
        bw["direct_read_gbps"] = read_bandwidth(self.weights, min(size, 4 << 30), 32, 8 << 20, direct=True)
        bw["pinned_h2d_gbps"] = info["pinned_h2d_gbps"]
        bw["weights_sample"] = compressibility([self.weights])
        self.results["bandwidth"] = bw
        log("bandwidth", **bw)

    def start_worker(self, tag: str, fresh_caches: bool) -> dict[str, Any]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        cache = self.work / f"inductor-{tag}"
        if fresh_caches:
            shutil.rmtree(cache, ignore_errors=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        env["TRITON_CACHE_DIR"] = str(cache / "triton")
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"worker-{tag}.log", "ab")
        argv = [
            sys.executable,
            str(HERE / "worker.py"),
            "--weights",
            str(self.weights),
            "--port",
            str(PORT),
            "--alloc",
            self.args.alloc,
            "--batch-sizes",
            self.args.batch_sizes,
        ]
        drop = drop_caches([self.weights])
        started = time.perf_counter()
        self.worker = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd=self.work
        )
        self.worker_pid = self.worker.pid
        ping = wait_ready(self.worker, self.args.cold_timeout)
        ready = time.perf_counter() - started
        cold = {"cold_to_ready_s": ready, "page_cache": drop, **ping["timings"], "memory": ping["memory"]}
        log("worker ready", **cold)
        return cold

    def helper_check(self) -> dict[str, Any]:
        """The agent must refuse processes with NVIDIA mappings that are not CUDA processes, before
        locking anything: first whatever the warmed worker has (torch.compile's pool), then a
        deliberately forked child."""
        out: dict[str, Any] = {}
        driver = load_driver()
        helpers_seen = [p for p in procfs.process_tree(self.worker_pid) if p != self.worker_pid]
        out["worker_children"] = [cuda_devices.describe_process(p) for p in helpers_seen]
        out["children_with_nvidia"] = [p for p in helpers_seen if cuda_devices.nvidia_usage(p).any]

        def attempt(label: str) -> None:
            step = DriverCuda(driver=driver)
            try:
                anyio.run(step.prepare, tree_tasks(self.worker_pid))
            except CudaHelperProcesses as exc:
                out[label] = {"refused": True, "pids": exc.pids, "message": str(exc)[:600]}
            else:
                anyio.run(step.abort)
                out[label] = {"refused": False}
            out[label]["worker_state_after"] = str(driver.state(self.worker_pid))

        attempt("compile_pool")
        forked = request({"cmd": "fork_helper"})["helper_pid"]
        attempt("forked_child")
        out["forked_child"]["expected_pid"] = forked
        request({"cmd": "kill_helper"})
        log("helper check", **{k: v for k, v in out.items() if k != "worker_children"})
        return out

    def checkpoint(self, name: str, prepare: dict[str, Any]) -> dict[str, Any]:
        prep = request({"cmd": "prepare", **prepare})
        step = DriverCuda()
        started = time.perf_counter()
        done = anyio.run(
            lambda: tree.checkpoint_tree(
                self.worker_pid, self.base, name, self.bundle, step, self.settings, release=True
            )
        )
        total = time.perf_counter() - started
        result = {
            "prepare": prep,
            "seconds": done.seconds,
            "total_s": total,
            "image_bytes": done.image_bytes,
            "pages_bytes": sum(int(f["size"]) for f in done.manifest["files"] if f["path"].startswith("pages-")),
            "compatibility": done.manifest["compatibility"],
            "cuda": done.manifest["cuda"],
        }
        pages = [done.directory / f["path"] for f in done.manifest["files"] if f["path"].startswith("pages-")]
        result["pages_sample"] = compressibility(pages)
        if self.args.compression_probe and name == "B-freed":
            result["compression_probe"] = compression_probe(pages, self.work / "pages.z")
        if not prepare.get("release_weights"):
            result["source_after_release"] = request({"cmd": "state"})["matches_reference"]
        log(f"checkpoint {name}", **{k: v for k, v in result.items() if k not in ("prepare",)})
        return result

    def restore(self, name: str, ckpt: str, io_threads: int, overlap: bool, prefetch: bool) -> dict[str, Any]:
        drop = drop_caches([self.weights, self.base])
        step = DriverCuda()
        started = time.perf_counter()
        done = anyio.run(
            lambda: tree.restore_tree(
                self.base,
                ckpt,
                self.bundle,
                step,
                self.settings,
                io_threads=io_threads,
                prefetch=[self.weights] if prefetch else [],
                prefetch_threads=self.args.prefetch_threads,
                overlap=overlap,
            )
        )
        restored = time.perf_counter()
        after = request({"cmd": "after_restore"})
        ready = time.perf_counter()
        state = request({"cmd": "state"})
        served = time.perf_counter()
        fetched = done.prefetch.wait() if done.prefetch is not None else None
        kill_and_reap(done.pid)
        result = {
            "page_cache": drop,
            "io_threads": io_threads,
            "overlap": overlap,
            "prefetch_weights": prefetch,
            "seconds": done.seconds,
            "pipeline_s": restored - started,
            "after_restore": after,
            "restore_to_ready_s": ready - started,
            "first_state_s": served - ready,
            "matches_reference": state["matches_reference"],
            "tcp_served": True,
            "prefetch": None if fetched is None else {"bytes": fetched.bytes_read, "s": fetched.seconds},
            "gpu_pairs": done.gpu_pairs,
        }
        log(f"restore {name}", **result)
        if not state["matches_reference"]:
            raise RuntimeError(f"restore {name}: state differs from the reference: {state}")
        return result

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)
        self.env()
        self.save()
        if not self.weights.exists() or self.args.regenerate:
            self.prepare_weights()
        self.save()
        self.results["cold"] = self.start_worker("cold", fresh_caches=True)
        self.results["reference"] = request({"cmd": "state"})
        self.save()
        self.results["helpers"] = self.helper_check()
        self.save()
        ckpts = self.results.setdefault("checkpoints", {})
        plan = [
            ("A-stock", {"stop_helpers": True}),
            ("B-freed", {"stop_helpers": True, "empty_cache": True}),
            ("C-noweights", {"stop_helpers": True, "empty_cache": True, "release_weights": True}),
        ]
        if self.args.alloc != "vmm":
            plan = plan[:2]
        for name, prepare in plan:
            if self.worker.poll() is not None:
                ckpts[name] = {"error": f"worker exited with {self.worker.returncode}"}
                break
            try:
                ckpts[name] = self.checkpoint(name, prepare)
            except Exception as exc:  # keep what was measured; the rest of the plan may still run
                log(f"checkpoint {name} FAILED", error=str(exc)[-2000:])
                ckpts[name] = {"error": str(exc)[-4000:]}
            self.save()
        self.worker.kill()
        self.worker.wait()
        restores = self.results.setdefault("restores", {})
        # Each row adds one change to the one above it.
        runs = [
            ("A-stock/1", "A-stock", 1, False, False),
            ("B-freed/1", "B-freed", 1, False, False),
            ("B-freed/16", "B-freed", 16, False, False),
            ("B-freed/16+overlap", "B-freed", 16, True, False),
            ("C-noweights/16+overlap", "C-noweights", 16, True, False),
            ("C-noweights/16+overlap+prefetch", "C-noweights", 16, True, True),
        ]
        for name, ckpt, threads, overlap, prefetch in runs:
            if "error" in ckpts.get(ckpt, {"error": "not taken"}):
                continue
            try:
                restores[name] = self.restore(name, ckpt, threads, overlap, prefetch)
            except Exception as exc:
                log(f"restore {name} FAILED", error=str(exc)[-2000:])
                restores[name] = {"error": str(exc)[-4000:]}
                kill_and_reap(self.worker_pid)  # a half-restored tree holds the PIDs
            self.save()


def table(results: dict[str, Any]) -> str:
    bw = results.get("bandwidth", {})
    disk = max(bw.get("parallel_read_gbps") or 0.0, bw.get("direct_read_gbps") or 0.0) or 1.0
    h2d = bw.get("pinned_h2d_gbps") or 1.0
    weights = results.get("weights", {}).get("weights_bytes", 0)
    cold = results.get("cold", {}).get("cold_to_ready_s")
    lines = [
        f"storage read: {bw.get('parallel_read_gbps', 0):.2f} GB/s (16 readers), "
        f"{bw.get('direct_read_gbps', 0):.2f} GB/s (32 O_DIRECT readers), "
        f"{bw.get('sequential_read_gbps', 0):.2f} GB/s (1 stream); "
        f"pinned H2D {h2d:.1f} GB/s; weights {weights / 1e9:.2f} GB",
        f"cold start to ready: {cold:.1f} s" if cold else "cold start: not measured",
        "",
        "| restore | image GB | CUDA ckpt s | CRIU dump s | verify s | CRIU restore s | pages verified in memory s "
        "| CUDA restore s | reload s | restore->ready s | bytes read GB | SoL s | x SoL | x faster than cold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.get("restores", {}).items():
        ck = results["checkpoints"][name.split("/")[0]]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-160:]!r} |")
            continue
        image = ck["image_bytes"]
        reread = weights if r["after_restore"].get("reloaded") else 0  # weights come from their file
        read = image + reread
        sol = max(read / (disk * 1e9), (ck["pages_bytes"] + reread) / (h2d * 1e9))
        ready = r["restore_to_ready_s"]
        reload = r["after_restore"].get("reload_s", 0.0)
        lines.append(
            f"| {name} | {image / 1e9:.2f} | {ck['seconds'].get('cuda', 0):.2f} | {ck['seconds'].get('dump', 0):.2f} "
            f"| {r['seconds'].get('verify', 0):.2f} | {r['seconds'].get('criu', 0):.2f} "
            f"| {r['seconds'].get('verify-memory', 0):.2f} "
            f"| {r['seconds'].get('cuda', 0):.2f} "
            f"| {reload:.2f} | {ready:.2f} | {read / 1e9:.2f} | {sol:.2f} | {ready / sol:.2f} "
            f"| {(cold / ready) if cold else 0:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dynamo-snapshot-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-gpu-out"))
    parser.add_argument("--weights-gib", type=float, default=8.0)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--alloc", choices=["vmm", "torch"], default="vmm")
    parser.add_argument("--network-lock", default="nftables")
    parser.add_argument("--cold-timeout", type=float, default=400.0)
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--prefetch-threads", type=int, default=16)
    parser.add_argument("--compression-probe", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    become_subreaper()
    bench = Bench(args)
    try:
        bench.run()
    finally:
        if bench.worker is not None and bench.worker.poll() is None:
            bench.worker.kill()
        bench.save()
        text = table(bench.results)
        (args.out / "table.md").write_text(text + "\n")
        print(text, flush=True)
        with tarfile.open(args.out / "bench-logs.tgz", "w:gz") as tar:
            for path in sorted(bench.logs.glob("*.log")) + sorted(bench.base.rglob("*.log")):
                tar.add(path, arcname=str(path.relative_to(args.work)))


if __name__ == "__main__":
    main()
