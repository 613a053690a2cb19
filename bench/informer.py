"""Benchmark: dynamo_snapshot.kube's informer pipeline against a kopf operator, on the same pods of the
same API server, side by side in one run.

    .venv/bin/pip install -e '.[test,bench]'
    .venv/bin/python bench/informer.py                   # starts a local control plane in a temp dir
    .venv/bin/python bench/informer.py --kubeconfig PATH --objects 10000 --json results.json

It creates OBJECTS pods (realistic specs, never scheduled) in a fresh namespace, then runs each contender
in a process of its own, one after the other:
- ours, dicts: reflector + store (plain dicts, managedFields stripped) + work queue + one worker;
- ours, structs: the same, decoding pods into a lean msgspec struct (what a node agent keeps);
- kopf: @kopf.index of every pod (its cache) + @kopf.on.event (its per-object workers).
For each: the initial LIST into the cache (events/s until a worker has every key), RSS of the process
before and with every pod cached, then OBJECTS live updates (one patch per pod, written by this driver at
full speed): events/s seen through the pipeline, lag behind the last write, and CPU seconds spent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import psutil
import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _parallel import in_parallel  # noqa: E402  (bench/ is this script's sys.path[0])

from dynamo_snapshot.kube import NAMESPACES, PODS, Client, Informer, Resource, load_kubeconfig  # noqa: E402

SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts", "ServiceAccount")
MiB = 1024 * 1024


def pod(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"bench-{i:05d}",
                     "labels": {"app": "bench", "shard": str(i % 16), "nvidia.com/dynamo-component": "worker"},
                     "annotations": {"bench/seq": str(i)}},
        "spec": {
            "schedulerName": "bench-nobody",  # never scheduled: no kubelet, no status churn
            "containers": [
                {"name": "main", "image": "registry.example.com/dynamo/vllm-runtime:0.1.0",
                 "command": ["python3", "-m", "dynamo.vllm"],
                 "args": ["--model", "meta-llama/Meta-Llama-3-8B-Instruct", "--max-model-len", "8192"],
                 "env": [{"name": f"SETTING_{k}", "value": f"value-{k}-{i}"} for k in range(8)],
                 "ports": [{"name": "http", "containerPort": 8000}],
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}},
                {"name": "sidecar", "image": "busybox:1.36", "command": ["sleep", "infinity"]},
            ],
        },
    }


class ContenderProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.events: dict[str, dict[str, Any]] = {}
        self._changed = anyio.Event()

    async def _read(self, stream: anyio.abc.ByteReceiveStream) -> None:
        buffer = b""
        async for chunk in stream:
            *lines, buffer = (buffer + chunk).split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self.events[message["event"]] = message
                self._changed.set()
                self._changed = anyio.Event()

    async def wait(self, event: str, limit: float = 900) -> dict[str, Any]:
        with anyio.fail_after(limit):
            while event not in self.events:
                await self._changed.wait()
        return self.events[event]

    async def run(self, client: Client, namespace: str, objects: int, round_no: int,
                  limit: float) -> dict[str, Any]:
        result: dict[str, Any] = {"contender": self.name}
        with self.log.open("wb") as log:
            process = await anyio.open_process(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=log, env=self.env, cwd=REPO)
        assert process.stdin is not None and process.stdout is not None
        async with process, anyio.create_task_group() as tg:
            tg.start_soon(self._read, process.stdout)
            try:
                await self.wait("ready", 120)
                proc = psutil.Process(process.pid)
                rss_idle = proc.memory_info().rss
                cpu0 = sum(proc.cpu_times()[:2])
                go = time.time()
                await process.stdin.send(b"go\n")
                result["rss_idle_mib"] = round(rss_idle / MiB, 1)
                try:
                    synced = await self.wait("synced", limit)
                except TimeoutError:
                    # (kopf with an index holds every handler back until the index is complete)
                    result["list_seconds"] = f"> {limit:.0f} (gave up)"
                    result["list_cpu_s"] = round(sum(proc.cpu_times()[:2]) - cpu0, 2)
                    result["rss_cached_mib"] = f"{proc.memory_info().rss / MiB:.1f} (unfinished)"
                    return result
                sync_s = synced["t"] - go
                rss_cached = proc.memory_info().rss
                cpu1 = sum(proc.cpu_times()[:2])
                result.update(list_seconds=round(sync_s, 3), list_events_per_s=round(objects / sync_s),
                              list_cpu_s=round(cpu1 - cpu0, 2), rss_cached_mib=round(rss_cached / MiB, 1),
                              rss_cache_delta_mib=round((rss_cached - rss_idle) / MiB, 1))

                first_write = time.time()
                await in_parallel(objects, lambda i: client.patch(
                    PODS, f"bench-{i:05d}", {"metadata": {"annotations": {"bench/round": str(round_no)}}}, namespace))
                last_write = time.time()
                updated = await self.wait("updated", limit)
                cpu2 = sum(proc.cpu_times()[:2])
                result.update(write_rate_per_s=round(objects / (last_write - first_write)),
                              watch_events_per_s=round(objects / (updated["t"] - first_write)),
                              watch_lag_after_last_write_s=round(updated["t"] - last_write, 3),
                              watch_cpu_s=round(cpu2 - cpu1, 2),
                              watch_events_per_cpu_s=round(objects / max(cpu2 - cpu1, 1e-3)),
                              rss_after_updates_mib=round(proc.memory_info().rss / MiB, 1))
                await process.stdin.send(b"quit\n")
                with anyio.move_on_after(30):
                    await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                tg.cancel_scope.cancel()
        return result


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("initial LIST -> cache -> queue: seconds", "list_seconds"),
        ("initial LIST: events/s", "list_events_per_s"),
        ("initial LIST: CPU seconds", "list_cpu_s"),
        ("RSS before listing (MiB)", "rss_idle_mib"),
        ("RSS with every pod cached (MiB)", "rss_cached_mib"),
        ("  of which the cache (MiB)", "rss_cache_delta_mib"),
        ("live updates written by the driver/s", "write_rate_per_s"),
        ("live updates seen through the pipeline/s", "watch_events_per_s"),
        ("lag behind the last write (s)", "watch_lag_after_last_write_s"),
        ("CPU seconds for the live updates", "watch_cpu_s"),
        ("  events per CPU second (capacity)", "watch_events_per_cpu_s"),
        ("RSS after the updates (MiB)", "rss_after_updates_mib"),
    ]
    header = "| | " + " | ".join(r["contender"] for r in results) + " |"
    lines = [header, "|---" * (len(results) + 1) + "|"]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(str(r.get(key, "-")) for r in results) + " |")
    return "\n".join(lines)


async def bench(kubeconfig: Path, objects: int, keep: bool, workdir: Path, limit: float,
                kopf_index_limit: float) -> list[dict[str, Any]]:
    namespace = f"bench-informer-{uuid.uuid4().hex[:6]}"
    async with Client(load_kubeconfig(kubeconfig)) as client:
        await client.create(NAMESPACES, {"metadata": {"name": namespace}})
        try:
            # Pods need the namespace's default ServiceAccount, which kube-controller-manager creates.
            accounts = Informer(client, SERVICE_ACCOUNTS, namespace=namespace)
            async with anyio.create_task_group() as tg:
                tg.start_soon(accounts.run)
                with anyio.fail_after(120):
                    await accounts.wait_until(lambda: f"{namespace}/default" in accounts.store)
                tg.cancel_scope.cancel()
            started = time.time()
            await in_parallel(objects, lambda i: client.create(PODS, pod(i), namespace))
            print(f"created {objects} pods in {time.time() - started:.1f}s", file=sys.stderr)

            env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(REPO)}
            python = sys.executable
            contenders = [
                ContenderProcess("ours (dicts)", [python, "bench/informer_ours.py", str(kubeconfig), namespace,
                                                  str(objects), "dicts"], env, workdir / "ours-dicts.log"),
                ContenderProcess("ours (structs)", [python, "bench/informer_ours.py", str(kubeconfig), namespace,
                                                    str(objects), "structs"], env, workdir / "ours-structs.log"),
                ContenderProcess("kopf (events, no cache)", [python, "bench/informer_kopf.py", namespace,
                                                             str(objects), "events"], env, workdir / "kopf.log"),
                ContenderProcess("kopf (index = cache)", [python, "bench/informer_kopf.py", namespace,
                                                          str(objects), "index"], env, workdir / "kopf-index.log"),
            ]
            results = []
            for round_no, contender in enumerate(contenders, 1):
                print(f"running {contender.name} ...", file=sys.stderr)
                results.append(await contender.run(client, namespace, objects, round_no,
                                                   kopf_index_limit if "index" in contender.name else limit))
                print(json.dumps(results[-1]), file=sys.stderr)
            return results
        finally:
            if not keep:
                await client.delete(NAMESPACES, namespace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--kubeconfig", type=Path, default=os.environ.get("KUBECONFIG") or None,
                        help="a cluster to use (default: start a local control plane)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the namespace and its pods")
    parser.add_argument("--limit", type=float, default=900, help="seconds a contender may take for a phase")
    parser.add_argument("--kopf-index-limit", type=float, default=300,
                        help="seconds kopf with an index may take to list (it slows down as it fills)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    with tempfile.TemporaryDirectory(prefix="bench-informer-") as tmp:
        workdir = Path(tmp)
        cluster = None
        if args.kubeconfig is None:
            from dynamo_snapshot.devcluster import LocalCluster

            cluster = LocalCluster(workdir / "cluster").start()
            args.kubeconfig = cluster.kubeconfig
        try:
            results = anyio.run(bench, args.kubeconfig, args.objects, args.keep, workdir, args.limit,
                                args.kopf_index_limit)
        finally:
            if cluster is not None:
                cluster.stop()
    print(f"{args.objects} pods; Python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"{platform.machine()}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"objects": args.objects, "results": results}, indent=2))


if __name__ == "__main__":
    main()
