"""GPU benchmark of an unmodified transformers worker (hf_worker.py) through the project's pipeline
(``dynamo_snapshot.agent.tree``: CUDA driver checkpoint + CRIU + verified artifact), against the
goals of issue 17. Run as root on a GPU machine; see bench/gpu/README.md (``hf.sh``).

Stages (one run, each measured against its limit in the same run):

    model       a random Llama-3-8B-shaped model directory (hf_model.py), unless already there;
                pinned H2D and D2H bandwidth
    bandwidth   storage read (16 readers; 32 O_DIRECT readers) and write (one stream, fsynced)
    cold        page cache dropped, empty compile caches: worker start -> serving; ``state`` twice
    checkpoint  agent.tree's checkpoint of the worker's tree (stage times, image bytes, the page
                images digested during the dump: --digests-after-dump for none); the source,
                released, answers ``state`` again
    restore     page cache dropped: agent.tree's restore -> serving; ``state`` equal to the cold one
    warm        killed, restored again with the image still in the page cache; equal again

The worker runs with ``TORCHINDUCTOR_COMPILE_THREADS=1`` (a deployment setting: torch.compile
compiles in-process instead of in a pool of helpers holding NVIDIA mappings, which the agent
refuses). A refusal is recorded in the results, not raised. Writes to --out: hf-results.json,
hf-logs.tgz (worker and CRIU logs); the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# bench/gpu/run.py: the stand-in worker's benchmark, whose helpers these are (it puts the repository on sys.path)
from run import (  # noqa: E402
    PORT,
    Bench,
    become_subreaper,
    drop_caches,
    kill_and_reap,
    log,
    read_bandwidth,
    request,
    wait_ready,
)

from dynamo_snapshot.agent import tree  # noqa: E402
from dynamo_snapshot.agent.artifact import authn  # noqa: E402
from dynamo_snapshot.agent.artifact.authn import default_keyring  # noqa: E402
from dynamo_snapshot.agent.artifact.nodecache import NodeCache  # noqa: E402
from dynamo_snapshot.agent.cuda import devices as cuda_devices  # noqa: E402
from dynamo_snapshot.agent.cuda.driverstep import CudaHelperProcesses, DriverCuda  # noqa: E402
from dynamo_snapshot.agent.host import procfs  # noqa: E402

CHECKPOINT = "hf"
RESTORE_GOAL = 1.25  # x (image / storage read + GPU bytes / pinned H2D), page cache dropped
CHECKPOINT_GOAL = 1.3  # x (GPU bytes / D2H + image / storage write)
WARM_GOAL = 25.0  # x faster than the cold start, image in memory


def write_bandwidth(path: Path, nbytes: int, chunk: int = 16 << 20) -> float:
    """GB/s writing ``nbytes`` of random bytes to ``path`` in one stream, fsync included."""
    data = os.urandom(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    started = time.perf_counter()
    try:
        for _ in range(0, nbytes, chunk):
            os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started
    path.unlink()
    return nbytes // chunk * chunk / seconds / 1e9


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("tokens") == b.get("tokens") and a.get("checksums") == b.get("checksums")


class HfBench(Bench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.model = args.model or self.work / f"llama3-8b-shape-{args.layers}l"
        self.base = self.work / "hf-checkpoints"
        self.logs = self.work / "hf-logs"
        self.deadline = time.monotonic() + args.budget
        self._cache: NodeCache | None = None

    def save(self) -> None:
        (self.out / "hf-results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def prepare_model(self) -> None:
        started = time.perf_counter()
        argv = [sys.executable, str(HERE / "hf_model.py"), "--out", str(self.model), "--layers",
                str(self.args.layers), "--bandwidth"]
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=max(30.0, self.left()))
        info = json.loads(out.stdout.strip().splitlines()[-1])
        info["step_s"] = round(time.perf_counter() - started, 1)
        self.results["model"] = info
        log("model", **info)

    def measure_storage(self) -> None:
        shard = max((self.model / s for s in self.results["model"]["shards"]), key=lambda p: p.stat().st_size)
        size = min(shard.stat().st_size, 4 << 30)
        bw: dict[str, Any] = {"file": str(shard), "bytes": size, "page_cache": drop_caches([self.model])}
        bw["parallel_read_gbps"] = read_bandwidth(shard, size, 16, 16 << 20)
        drop_caches([self.model])
        bw["direct_read_gbps"] = read_bandwidth(shard, size, 32, 8 << 20, direct=True)
        bw["write_gbps"] = write_bandwidth(self.work / "write-probe", self.args.write_probe_gib << 30)
        bw["read_gbps"] = max(bw["parallel_read_gbps"], bw["direct_read_gbps"])
        self.results["bandwidth"] = bw
        log("storage", **bw)

    def start_cold(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        caches = self.work / "hf-compile-caches"
        shutil.rmtree(caches, ignore_errors=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(caches / "inductor")
        env["TRITON_CACHE_DIR"] = str(caches / "triton")
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / "hf-worker.log", "ab")
        argv = [sys.executable, str(HERE / "hf_worker.py"), "--model", str(self.model), "--port", str(PORT)]
        drop = drop_caches([self.model])
        started = time.perf_counter()
        self.worker = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True, cwd=self.work)
        self.worker_pid = self.worker.pid
        ping = wait_ready(self.worker, min(self.args.cold_timeout, self.left()))
        ready = time.perf_counter() - started
        first = request({"cmd": "state"})
        second = request({"cmd": "state"})
        self.results["cold"] = {"cold_to_serving_s": ready, "page_cache": drop, "ping": ping,
                                "deterministic": same_state(first, second), "worker_env": {
                                    "TORCHINDUCTOR_COMPILE_THREADS": "1", "HF_HUB_OFFLINE": "1"}}
        self.results["reference"] = first
        log("cold", **{k: v for k, v in self.results["cold"].items() if k != "ping"}, mode=ping["mode"],
            timings=ping["timings"], memory=ping["memory"])

    def take_checkpoint(self) -> bool:
        children = [p for p in procfs.process_tree(self.worker_pid) if p != self.worker_pid]
        result: dict[str, Any] = {"worker_children": [cuda_devices.describe_process(p) for p in children]}
        self.results["checkpoint"] = result
        shutil.rmtree(self.base, ignore_errors=True)
        started = time.perf_counter()
        try:
            done = anyio.run(lambda: tree.checkpoint_tree(
                self.worker_pid, self.base, CHECKPOINT, self.bundle, DriverCuda(), self.settings, release=True,
                digest_during_dump=not self.args.digests_after_dump))
        except CudaHelperProcesses as exc:
            result.update(refused=True, pids=exc.pids, message=str(exc)[-2000:])
            log("checkpoint REFUSED", **result)
            return False
        result.update(total_s=time.perf_counter() - started, seconds=done.seconds, image_bytes=done.image_bytes,
                      files={f["path"]: int(f["size"]) for f in done.manifest["files"]}, cuda=done.manifest["cuda"],
                      digested_during_dump=list(done.digested_during_dump))
        result["source_equal_after"] = same_state(request({"cmd": "state"}), self.results["reference"])
        log("checkpoint", **{k: v for k, v in result.items() if k != "files"})
        return True

    def restore_once(self, name: str, drop: bool, env: dict[str, str] | None = None) -> dict[str, Any]:
        env = dict(env or {})
        io_threads = int(env.pop("io_threads", self.args.io_threads))  # a setting of the pipeline, not of CRIU
        cache = self.staged(io_threads) if env.pop("staged", "") else None  # pre-staged in the node cache
        page_cache = drop_caches([self.model, self.base]) if drop else "warm (read by the run before)"
        saved = {key: os.environ.get(key) for key in env or {}}
        os.environ.update(env or {})  # CRIU inherits it (the patched CRIU's DYNAMO_CRIU_RESTORE_* settings)
        started = time.perf_counter()
        try:
            done = anyio.run(lambda: tree.restore_tree(self.base, CHECKPOINT, self.bundle, DriverCuda(),
                                                       self.settings, io_threads=io_threads, overlap=True,
                                                       cache=cache))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        restored = time.perf_counter()
        ping = wait_ready(None, 60)
        serving = time.perf_counter()
        state = request({"cmd": "state"})
        answered = time.perf_counter()
        kill_and_reap(done.pid)
        result = {"page_cache": page_cache, "dropped": drop, "env": env, "io_threads": io_threads,
                  "staged": cache is not None, "stage_s": self.results.get("stage_s"),
                  "seconds": done.seconds,
                  "pipeline_s": restored - started, "restore_to_serving_s": serving - started,
                  "restore_to_first_state_s": answered - started, "state_generate_s": state.get("generate_s"),
                  "equal": same_state(state, self.results["reference"]), "pid": ping.get("pid")}
        log(f"restore {name}", **result)
        return result

    def staged(self, io_threads: int) -> NodeCache:
        """The node cache holding the checkpoint, as an agent's pre-staging leaves it (filled once, off the
        restore's path: the time is ``stage_s``)."""
        if self._cache is None:
            # on tmpfs by default: the device's one disk cannot hold the model, the checkpoint and a copy
            self._cache = NodeCache(self.args.node_cache, 64 << 30, io_threads=io_threads)
            started = time.perf_counter()
            version = self.base / CHECKPOINT / "versions" / "1"
            self._cache.fill_in_background(CHECKPOINT, "1", version, authn.open_manifest(version, default_keyring()))
            self._cache.settle()
            self.results["stage_s"] = time.perf_counter() - started
            if not self._cache.entries():
                raise RuntimeError("the node cache did not take the checkpoint (see the log)")
        return self._cache

    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.env()
        self.save()
        self.prepare_model()
        self.measure_storage()
        self.save()
        self.start_cold()
        self.save()
        taken = self.take_checkpoint()
        self.save()
        self.worker.kill()
        self.worker.wait()
        if not taken:
            return
        restores = self.results.setdefault("restores", {})
        for name, drop, env in self.args.variants:
            try:
                restores[name] = self.restore_once(name, drop, env)
            except Exception as exc:  # keep what was measured
                log(f"restore {name} FAILED", error=str(exc)[-2000:])
                restores[name] = {"error": str(exc)[-4000:]}
                kill_and_reap(self.worker_pid)  # a half-restored tree holds the PIDs
            self.save()


def limits(results: dict[str, Any]) -> dict[str, float]:
    """The speed-of-light of each goal, from the bandwidths measured in the same run. Pure."""
    bw, model = results.get("bandwidth", {}), results.get("model", {})
    gpu = results.get("cold", {}).get("ping", {}).get("memory", {}).get("device_used", 0)
    image = results.get("checkpoint", {}).get("image_bytes", 0)
    out = {"gpu_bytes": gpu, "image_bytes": image}
    if bw.get("read_gbps") and model.get("pinned_h2d_gbps"):
        out["restore_sol_s"] = image / (bw["read_gbps"] * 1e9) + gpu / (model["pinned_h2d_gbps"] * 1e9)
    if bw.get("write_gbps") and model.get("pinned_d2h_gbps"):
        out["checkpoint_gpu_sol_s"] = gpu / (model["pinned_d2h_gbps"] * 1e9)
        out["checkpoint_image_sol_s"] = image / (bw["write_gbps"] * 1e9)
        out["checkpoint_sol_s"] = out["checkpoint_gpu_sol_s"] + out["checkpoint_image_sol_s"]
    return out


def _stages(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())


def _ratio(value: float | None, limit: float | None) -> str:
    return f"{value / limit:.2f}" if value and limit else "-"


def table(results: dict[str, Any]) -> str:
    bw, model, lim = results.get("bandwidth", {}), results.get("model", {}), limits(results)
    cold = results.get("cold", {})
    cold_s = cold.get("cold_to_serving_s")
    ping = cold.get("ping", {})
    lines = [
        f"model: {model.get('bytes', 0) / 1e9:.2f} GB in {len(model.get('shards', []))} shards, "
        f"{model.get('layers', '?')} layers; worker mode {ping.get('mode', '?')} (compiled {ping.get('compiled')}), "
        f"{ping.get('versions', {})}",
        f"storage read {bw.get('parallel_read_gbps', 0):.2f} GB/s (16 readers), {bw.get('direct_read_gbps', 0):.2f} "
        f"GB/s (32 O_DIRECT), write {bw.get('write_gbps', 0):.2f} GB/s; pinned H2D "
        f"{model.get('pinned_h2d_gbps', 0):.1f} GB/s, D2H {model.get('pinned_d2h_gbps', 0):.1f} GB/s",
        f"GPU bytes {lim['gpu_bytes'] / 1e9:.2f} GB; image {lim['image_bytes'] / 1e9:.2f} GB",
        "",
        "| step | s | stages s | limit s | x limit (goal) | x faster than cold (goal) | equal to cold |",
        "|---|---|---|---|---|---|---|",
    ]
    if cold_s:
        t = ping.get("timings", {})
        lines.append(f"| cold start -> serving | {cold_s:.2f} | import {t.get('import_s', 0):.2f}, load "
                     f"{t.get('load_s', 0):.2f}, warm-up (compile, CUDA graphs) {t.get('warmup_s', 0):.2f} | - | - "
                     f"| - | deterministic {cold.get('deterministic')} |")
    ck = results.get("checkpoint", {})
    if ck.get("refused"):
        lines.append(f"| checkpoint | refused | {ck.get('message', '')[:300]!r} | | | | |")
    elif ck.get("total_s"):
        early = ck.get("digested_during_dump")
        digests = (f"; page images digested during the dump: {', '.join(early) or 'none'}" if early is not None
                   else "")
        split = (f" (GPU / D2H {lim['checkpoint_gpu_sol_s']:.2f} + image / write {lim['checkpoint_image_sol_s']:.2f})"
                 if "checkpoint_gpu_sol_s" in lim else "")
        lines.append(f"| checkpoint | {ck['total_s']:.2f} | {_stages(ck.get('seconds', {}))}{digests} | "
                     f"{lim.get('checkpoint_sol_s', 0):.2f}{split} | "
                     f"{_ratio(ck['total_s'], lim.get('checkpoint_sol_s'))} "
                     f"(<= {CHECKPOINT_GOAL}) | - | source {ck.get('source_equal_after')} |")
    for name, r in results.get("restores", {}).items():
        dropped = r.get("dropped", name == "dropped")
        label = "restore, page cache dropped" if dropped else "restore, image in page cache"
        if r.get("staged"):
            label += f", pre-staged in the node cache (filled in {r.get('stage_s') or 0:.1f} s before)"
        if r.get("env") or r.get("io_threads") != 16:
            settings = [f"{k}={v}" for k, v in r.get("env", {}).items()] + [f"verifier threads {r.get('io_threads')}"]
            label += " (" + " ".join(settings) + ")"
        if "error" in r:
            lines.append(f"| {label} | failed | {r['error'][-300:]!r} | | | | |")
            continue
        ready = r["restore_to_serving_s"]
        goal = f"(<= {RESTORE_GOAL})" if dropped else "(storage limit; goal is memory speed)"
        cold_goal = "" if dropped else f"(>= {WARM_GOAL})"
        lines.append(f"| {label} -> serving | {ready:.2f} | {_stages(r.get('seconds', {}))}; first state at "
                     f"{r['restore_to_first_state_s']:.2f} | {lim.get('restore_sol_s', 0):.2f} | "
                     f"{_ratio(ready, lim.get('restore_sol_s'))} {goal} | {_ratio(cold_s, ready)} {cold_goal} "
                     f"| {r['equal']} |")
    return "\n".join(lines)


def pack_logs(hf: HfBench) -> None:
    with tarfile.open(hf.out / "hf-logs.tgz", "w:gz") as tar:
        for path in sorted(hf.logs.glob("*.log")) + sorted(hf.base.rglob("*.log")):
            tar.add(path, arcname=str(path.relative_to(hf.work)))


def variant(text: str) -> tuple[str, bool, dict[str, str]]:
    """'warm-par:warm:DYNAMO_CRIU_RESTORE_THREADS=16' -> ('warm-par', False, {...}). Pure."""
    name, _, rest = text.partition(":")
    cache, _, env = rest.partition(":")
    if cache not in ("dropped", "warm") or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:dropped|warm[:KEY=VALUE,...]")
    pairs = dict(item.split("=", 1) for item in env.split(",") if item)
    return name, cache == "dropped", pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/dynamo-snapshot-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench-gpu-out"))
    parser.add_argument("--model", type=Path, help="model directory (default: <work>/llama3-8b-shape-<layers>l)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--node-cache", type=Path, default=Path("/dev/shm/dynamo-snapshot-node-cache"),
                        help="the node cache of staged=1 variants (default on tmpfs: node RAM)")
    parser.add_argument("--network-lock", default="nftables")
    parser.add_argument("--io-threads", type=int, default=16, help="restore readers (verification, prefetch)")
    parser.add_argument("--cold-timeout", type=float, default=400.0)
    parser.add_argument("--write-probe-gib", type=int, default=4)
    parser.add_argument("--budget", type=float, default=530.0, help="seconds for the whole run (timeouts)")
    parser.add_argument("--digests-after-dump", action="store_true",
                        help="checkpoint with every digest taken after the dump (the pipeline before the follower)")
    parser.add_argument("--variant", dest="variants", action="append", type=variant, default=[],
                        help="NAME:dropped|warm[:KEY=VALUE,...] a restore to run (repeatable; staged=1 restores from a "
                             "node cache filled before (pre-staging); io_threads=N sets the "
                             "pipeline's readers, other keys CRIU's environment); default: "
                             "dropped:dropped and warm:warm. dropped: with the page cache dropped first")
    args = parser.parse_args()
    args.variants = args.variants or [("dropped", True, {}), ("warm", False, {})]
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still saves and packs what was measured
    become_subreaper()
    hf = HfBench(args)
    try:
        hf.run()
    except BaseException:
        worker_log = hf.logs / "hf-worker.log"
        if worker_log.is_file():  # why the worker failed, in the run's own log
            hf.results["worker_log_tail"] = worker_log.read_bytes()[-6000:].decode(errors="replace")
            print(hf.results["worker_log_tail"], flush=True)
        raise
    finally:
        if hf.worker is not None and hf.worker.poll() is None:
            hf.worker.kill()
        hf.results["limits"] = limits(hf.results)
        hf.save()
        print(table(hf.results), flush=True)
        pack_logs(hf)


if __name__ == "__main__":
    main()
