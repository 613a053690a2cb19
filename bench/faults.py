"""Benchmark: the operator against the real local control plane, with and without faults.

    .venv/bin/python bench/faults.py                                  # every scenario, 500 checkpoints
    .venv/bin/python bench/faults.py --objects 200 --scenarios raw,plain --json results.json

The control plane is etcd, kube-apiserver and kube-controller-manager (its Job controller makes each
Job's pod, its garbage collector removes what a deleted checkpoint owned; no scheduler, no kubelet: the
pods stay Pending). Each scenario gets a fresh namespace and its own operator process(es), started with
the chart's command line (podMount storage, 4 workers), and stopped after it:

    raw        the bench's client creates N Jobs like the operator's, 64 at a time: the floor
    plain      N DynamoCheckpoints, 64 at a time; seconds from the first create until N Jobs exist
    apiserver  as plain, kube-apiserver SIGKILLed and restarted K times once the first Job exists
    operator   as plain, the operator SIGKILLed and restarted K times once the first Job exists
    leader     two operators with --leader-elect; the leader SIGKILLed once the first Job exists:
               the handover (kill -> the Lease taken by the other) and its first Job
    deletes    as plain, D checkpoints deleted once a third of the Jobs exist: no Job is left without
               its checkpoint once the garbage collector is through (seconds until none is)

Every scenario checks that each (remaining) checkpoint has exactly one Job - no Job missing, none twice -
and prints one JSON line; ``--json`` writes them all. Numbers depend on the machine: the figures in the
README were measured on the 2-core CI machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from _parallel import in_parallel  # noqa: E402  (bench/ is this script's sys.path[0])

from dynamo_snapshot.api import names  # noqa: E402
from dynamo_snapshot.devcluster import binaries  # noqa: E402
from dynamo_snapshot.devcluster.cluster import Component, LocalCluster, _free_port  # noqa: E402
from dynamo_snapshot.devcluster.scenarios import checkpoint_manifest  # noqa: E402
from dynamo_snapshot.kube import (  # noqa: E402
    DYNAMO_CHECKPOINTS,
    JOBS,
    LEASES,
    NAMESPACES,
    PERSISTENT_VOLUME_CLAIMS,
    AlreadyExists,
    Client,
    Informer,
    KubeError,
    Resource,
    load_kubeconfig,
)

SCENARIOS = ("raw", "plain", "apiserver", "operator", "leader", "deletes")
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")
CRD_DIR = REPO / "helm" / "operator" / "crds"
PVC = "snapshot-pvc"
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                namespaced=False)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def retrying(call: Callable[[], Awaitable[Any]], within_s: float = 120) -> Any:
    """A client call while kube-apiserver may be away (killed by the scenario): retried until it answers."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except (KubeError, OSError):
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(0.2)


def raw_job(i: int) -> dict[str, Any]:
    """A Job shaped like the operator's checkpoint Job (one pod, the worker container)."""
    template = checkpoint_manifest(f"raw-{i}")["spec"]["job"]["podTemplateSpec"]
    template["spec"]["restartPolicy"] = "Never"
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": f"raw-{i:05d}", "labels": {names.LABEL_CHECKPOINT_ID: f"raw{i:013d}"}},
            "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 600, "template": template}}


class Bench:
    def __init__(self, root: Path, client: Client, cluster: LocalCluster, objects: int, kills: int, deletes: int,
                 workers: int = 4):
        self.root, self.client, self.cluster, self.workers = root, client, cluster, workers
        self.objects, self.kills, self.to_delete = objects, kills, deletes
        self.operators: list[str] = []
        self.stopped_cpu: dict[str, tuple[int, float]] = {}  # the operators' CPU when they were stopped
        self.restarted: set[str] = set()  # components the scenario killed and started again

    # -- parts ----------------------------------------------------------------------------------------------
    async def namespace(self, scenario: str) -> str:
        name = f"faults-{scenario}-{uuid.uuid4().hex[:6]}"
        await self.client.create(NAMESPACES, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        await self.client.create(PERSISTENT_VOLUME_CLAIMS, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PVC},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}}, name)
        return name

    def start_operator(self, namespace: str, label: str, leader: bool = False) -> str:
        config = self.root / f"operator-{namespace}.yaml"
        config.write_text(yaml.safe_dump({"checkpoint": {"enabled": True, "storage": {
            "type": "pvc", "accessMode": "podMount", "pvc": {"pvcName": PVC, "basePath": "/checkpoints",
                                                              "create": False}}}}))
        port = _free_port()
        argv = [sys.executable, "-m", "dynamo_snapshot.controllers", f"--kubeconfig={self.cluster.kubeconfig}",
                f"--config={config}", f"--namespace={namespace}", "--metrics-bind-address=0",
                f"--health-probe-bind-address=127.0.0.1:{port}", f"--workers={self.workers}",
                f"--log-level={'info' if leader else 'warning'}"]
        if leader:  # one Lease for every candidate of the namespace
            argv += ["--leader-elect", f"--leader-election-namespace={namespace}", "--leader-election-id=faults-lead"]
        name = f"operator-{label}"
        self.cluster.add_component(Component(name, lambda: argv, lambda: f"http://127.0.0.1:{port}/healthz"))
        self.cluster.start_component(name)
        self.operators.append(name)
        return name

    def stop_operators(self) -> None:
        self.stopped_cpu.update({name: used for name, used in self.cpu().items() if name in self.operators})
        for name in self.operators:
            self.cluster.stop_component(name, kill=True)
        self.operators.clear()

    async def create_checkpoints(self, namespace: str) -> None:
        async def one(i: int) -> None:
            body = checkpoint_manifest(f"ckpt-{i:05d}", model=f"demo/ckpt-{i:05d}")  # one checkpoint ID each

            async def create() -> None:
                try:
                    await self.client.create(DYNAMO_CHECKPOINTS, body, namespace)
                except AlreadyExists:
                    pass  # an earlier attempt landed; its answer was lost with a killed kube-apiserver
            await retrying(create)
        await in_parallel(self.objects, one)

    def jobs(self, namespace: str) -> Informer[Any]:
        return Informer(self.client, JOBS, namespace=namespace, label_selector=names.LABEL_CHECKPOINT_ID)

    @staticmethod
    def duplicates(jobs: Informer[Any]) -> int:
        ids = Counter((j["metadata"].get("labels") or {}).get(names.LABEL_CHECKPOINT_ID) for j in jobs.store.list())
        return sum(count - 1 for count in ids.values() if count > 1)

    async def kill_repeatedly(self, component: str, first_job: anyio.Event, restart: Callable[[], None]) -> list[float]:
        """SIGKILL ``component`` ``kills`` times once the first Job exists, restarting it each time (what
        systemd or the kubelet would); seconds each was away."""
        await first_job.wait()
        away = []
        self.restarted.add(component)
        for _ in range(self.kills):
            began = time.monotonic()
            await anyio.to_thread.run_sync(lambda: self.cluster.stop_component(component, kill=True))
            await anyio.to_thread.run_sync(restart)
            away.append(round(time.monotonic() - began, 2))
            await anyio.sleep(0.5)
        return away

    # -- one run ------------------------------------------------------------------------------------------
    async def run_checkpoints(self, namespace: str, during: Callable[[Informer[Any], anyio.Event],
                                                                     Awaitable[dict[str, Any]]] | None = None,
                              expected: int | None = None) -> dict[str, Any]:
        """Create the checkpoints (the operator runs); seconds until ``expected`` Jobs exist, and whatever
        ``during`` (started beside it, given the Jobs informer and a first-Job event) reports."""
        jobs = self.jobs(namespace)
        first_job = anyio.Event()
        jobs.add_handler(on_add=lambda _obj: first_job.set())
        report: dict[str, Any] = {}
        async with anyio.create_task_group() as tg:
            await tg.start(jobs.run)
            began = time.monotonic()

            side_done = anyio.Event()

            async def side() -> None:
                if during is not None:
                    report.update(await during(jobs, first_job))
                side_done.set()

            tg.start_soon(side)
            await self.create_checkpoints(namespace)
            report["created_s"] = round(time.monotonic() - began, 2)
            want = expected if expected is not None else self.objects
            with anyio.fail_after(600):
                await jobs.wait_until(lambda: len(jobs.store.list()) >= want)
            report["jobs_s"] = round(time.monotonic() - began, 2)
            with anyio.fail_after(600):
                await side_done.wait()  # every kill done (a run may finish before the last one)
            await anyio.sleep(3)  # late duplicates would show up here
            report["jobs"] = len(jobs.store.list())
            report["duplicates"] = self.duplicates(jobs)
            tg.cancel_scope.cancel()
        return report

    def cpu(self) -> dict[str, tuple[int, float]]:
        """(PID, CPU seconds used so far: user + system) of each running process of the cluster."""
        used = {}
        for name, component in self.cluster._components.items():
            if component.process is not None and component.process.poll() is None:
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{component.process.pid}/stat").read_text().rpartition(")")[2].split()
                    used[name] = (component.process.pid, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
        return used

    async def measured(self, scenario: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """A scenario's report plus where the CPU went meanwhile, per process (one restarted meanwhile is
        only said to be: its earlier lives are gone from /proc)."""
        before = self.cpu()
        self.stopped_cpu.clear()
        self.restarted.clear()
        report = await scenario()
        after = {**self.cpu(), **self.stopped_cpu}
        report["cpu_s"] = {name.removeprefix("kube-"): "restarted" if name in self.restarted
                           else round(seconds - before.get(name, (pid, 0.0))[1], 2)
                           for name, (pid, seconds) in sorted(after.items())}
        return report

    # -- scenarios ------------------------------------------------------------------------------------------
    async def raw(self) -> dict[str, Any]:
        namespace = await self.namespace("raw")
        jobs = self.jobs(namespace)
        async with anyio.create_task_group() as tg:
            await tg.start(jobs.run)
            began = time.monotonic()
            await in_parallel(self.objects, lambda i: self.client.create(JOBS, raw_job(i), namespace))
            created = time.monotonic() - began
            with anyio.fail_after(600):
                await jobs.wait_until(lambda: len(jobs.store.list()) >= self.objects)
            seen = time.monotonic() - began
            tg.cancel_scope.cancel()
        return {"created_s": round(created, 2), "jobs_s": round(seen, 2), "jobs": self.objects, "duplicates": 0}

    async def plain(self) -> dict[str, Any]:
        namespace = await self.namespace("plain")
        self.start_operator(namespace, "plain")
        try:
            return await self.run_checkpoints(namespace)
        finally:
            self.stop_operators()

    async def apiserver(self) -> dict[str, Any]:
        namespace = await self.namespace("apiserver")
        self.start_operator(namespace, "apiserver")

        async def kills(jobs: Informer[Any], first_job: anyio.Event) -> dict[str, Any]:
            away = await self.kill_repeatedly("kube-apiserver", first_job,
                                              lambda: self.cluster.start_component("kube-apiserver"))
            return {"apiserver_kills": len(away), "apiserver_away_s": away}
        try:
            return await self.run_checkpoints(namespace, kills)
        finally:
            self.stop_operators()

    async def operator(self) -> dict[str, Any]:
        namespace = await self.namespace("operator")
        name = self.start_operator(namespace, "killed")

        async def kills(jobs: Informer[Any], first_job: anyio.Event) -> dict[str, Any]:
            away = await self.kill_repeatedly(name, first_job, lambda: self.cluster.start_component(name))
            return {"operator_kills": len(away), "operator_away_s": away}
        try:
            return await self.run_checkpoints(namespace, kills)
        finally:
            self.stop_operators()

    async def leader(self) -> dict[str, Any]:
        namespace = await self.namespace("leader")
        candidates = [self.start_operator(namespace, f"lead-{i}", leader=True) for i in range(2)]

        async def handover(jobs: Informer[Any], first_job: anyio.Event) -> dict[str, Any]:
            """Kill -> the Lease held by the other candidate (``handover_s``) -> its first Job
            (``first_job_s``). Jobs are counted from the takeover on: the ones the killed leader had
            already sent land before it, and counting them made the handover look instant."""
            await first_job.wait()
            (leader,) = [c for c in candidates if "became leader" in self._log(c)]
            lease = Informer(self.client, LEASES, namespace=namespace)
            async with anyio.create_task_group() as tg:
                await tg.start(lease.run)
                (held,) = [obj["spec"].get("holderIdentity") for obj in lease.store.list()
                           if obj["metadata"]["name"] == "faults-lead"]
                before = len(jobs.store.list())
                killed = time.monotonic()
                await anyio.to_thread.run_sync(lambda: self.cluster.stop_component(leader, kill=True))
                await lease.wait_until(lambda: any(
                    obj["metadata"]["name"] == "faults-lead" and obj["spec"].get("holderIdentity") not in (None, held)
                    for obj in lease.store.list()))
                taken = time.monotonic()
                at_takeover = len(jobs.store.list())
                tg.cancel_scope.cancel()
            await jobs.wait_until(lambda: len(jobs.store.list()) > at_takeover)
            return {"handover_s": round(taken - killed, 2), "first_job_s": round(time.monotonic() - killed, 2),
                    "jobs_when_killed": before, "jobs_at_takeover": at_takeover}
        try:
            return await self.run_checkpoints(namespace, handover)
        finally:
            self.stop_operators()

    def _log(self, component: str) -> str:
        path = self.cluster.root / "logs" / f"{component}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def deletes(self) -> dict[str, Any]:
        namespace = await self.namespace("deletes")
        self.start_operator(namespace, "deletes")
        doomed = sorted(random.Random(7).sample(range(self.objects), self.to_delete))

        async def delete(jobs: Informer[Any], first_job: anyio.Event) -> dict[str, Any]:
            await jobs.wait_until(lambda: len(jobs.store.list()) >= self.objects // 3)
            await in_parallel(len(doomed), lambda i: retrying(lambda: self.client.delete(
                DYNAMO_CHECKPOINTS, f"ckpt-{doomed[i]:05d}", namespace, propagation_policy="Background")))
            return {"deleted": len(doomed)}
        try:
            report = await self.run_checkpoints(namespace, delete, expected=self.objects - self.to_delete)
            report.update(await self.orphans(namespace))
            return report
        finally:
            self.stop_operators()

    async def orphans(self, namespace: str) -> dict[str, Any]:
        """Seconds until no Job is left whose checkpoint is gone (the garbage collector's part)."""
        began = time.monotonic()
        while True:
            live = {c["metadata"]["uid"] for c in (await self.client.list(DYNAMO_CHECKPOINTS, namespace)).items}
            jobs = (await self.client.list(JOBS, namespace, label_selector=names.LABEL_CHECKPOINT_ID)).items
            orphaned = [j for j in jobs if not any(r.get("uid") in live for r in j["metadata"].get("ownerReferences")
                                                   or [])]
            if not orphaned or time.monotonic() - began > 120:
                return {"orphan_jobs": len(orphaned), "orphans_gone_s": round(time.monotonic() - began, 2),
                        "jobs_left": len(jobs)}
            await anyio.sleep(1)  # the garbage collector has no event to wait on from here


async def install_crds(client: Client) -> None:
    """The operator chart's CRDs, created and Established (no kubectl needed: the bench runs with just
    the three control-plane binaries)."""
    crds = Informer(client, CRDS)
    async with anyio.create_task_group() as tg:
        await tg.start(crds.run)
        wanted = set()
        for path in sorted(CRD_DIR.glob("*.yaml")):
            body = yaml.safe_load(path.read_text())
            wanted.add(body["metadata"]["name"])
            await client.create(CRDS, body)

        def established() -> bool:
            return all(any(c.get("type") == "Established" and c.get("status") == "True"
                           for c in ((crds.store.get(name) or {}).get("status") or {}).get("conditions") or [])
                       for name in wanted)
        with anyio.fail_after(60):
            await crds.wait_until(established)
        tg.cancel_scope.cancel()


async def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    cluster = LocalCluster(root / "cluster", components=CONTROL_PLANE, bin_dir=binaries.require(CONTROL_PLANE))
    results = []
    with cluster:
        async with Client(load_kubeconfig(cluster.kubeconfig)) as client:
            await install_crds(client)
            bench = Bench(root, client, cluster, args.objects, args.kills, args.deletes, args.workers)
            for scenario in args.scenarios:
                began = time.monotonic()
                measured = await bench.measured(getattr(bench, scenario))
                report = {"scenario": scenario, "objects": args.objects, "workers": args.workers, **measured}
                report["scenario_s"] = round(time.monotonic() - began, 2)
                print(json.dumps(report), flush=True)
                results.append(report)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=500)
    parser.add_argument("--kills", type=int, default=5, help="kube-apiserver / operator kills per scenario")
    parser.add_argument("--deletes", type=int, default=100, help="checkpoints deleted mid-run (deletes)")
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=list(SCENARIOS))
    parser.add_argument("--workers", type=int, default=4, help="the operator's --workers (the chart's default: 4)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the control plane on the way out
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        results = anyio.run(run, args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
