"""Leader election on a real Lease: two processes, exactly one leads; killing the leader hands over within
the lease duration; a clean shutdown releases the Lease; a lost Lease stops the controllers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import anyio
import anyio.abc
import pytest

from dynamo_snapshot.kube import (
    CONFIGMAPS,
    LEASES,
    Client,
    Controller,
    Informer,
    LeaderElectionLost,
    LeaderElector,
)
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD = 3.0, 2.0, 0.5


class Output:
    """The lines the candidate processes print, and a way to wait for a condition on them."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self._changed = anyio.Event()

    async def read(self, identity: str, process: anyio.abc.Process) -> None:
        assert process.stdout is not None
        lines = self.lines.setdefault(identity, [])
        buffer = b""
        async for chunk in process.stdout:
            *complete, buffer = (buffer + chunk).split(b"\n")
            lines.extend(line.decode() for line in complete)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_until(self, predicate) -> None:
        while not predicate():
            await self._changed.wait()


async def start(kubeconfig, namespace: str, identity: str, output: Output,
                tg: anyio.abc.TaskGroup) -> anyio.abc.Process:
    process = await anyio.open_process(
        [sys.executable, "-m", "tests.kube.lease_candidate", str(kubeconfig), namespace, "operator", identity,
         str(LEASE_DURATION), str(RENEW_DEADLINE), str(RETRY_PERIOD)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    output.lines[identity] = []
    tg.start_soon(output.read, identity, process)
    return process


async def holder(client: Client, namespace: str, name: str = "operator") -> str:
    lease = await client.get(LEASES, name, namespace)
    return lease["spec"].get("holderIdentity") or ""


async def test_two_processes_one_leader_and_handover_when_the_leader_is_killed(kubeconfig, client, namespace):
    output = Output()
    async with anyio.create_task_group() as tg:
        processes = {name: await start(kubeconfig, namespace, name, output, tg) for name in ("a", "b")}
        try:
            def settled() -> bool:
                # One leads, and the other has seen the Lease held by it (it tried, and keeps off).
                leaders = [n for n, lines in output.lines.items() if "leading" in lines]
                return len(leaders) == 1 and all(f"leader {leaders[0]}" in lines
                                                 for lines in output.lines.values())

            with anyio.fail_after(60):
                await output.wait_until(settled)
            leader = next(n for n, lines in output.lines.items() if "leading" in lines)
            follower = "b" if leader == "a" else "a"
            assert "leading" not in output.lines[follower]  # exactly one leads
            assert await holder(client, namespace) == leader

            processes[leader].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            with anyio.fail_after(60):
                await output.wait_until(lambda: "leading" in output.lines[follower])
            handover = time.monotonic() - killed_at
            assert await holder(client, namespace) == follower
            # The follower waits out the lease (counted from the last renewal it saw, at most one retry period
            # before the kill) and takes over at its next try (tries are jittered up to 2.2 retry periods).
            assert LEASE_DURATION - RETRY_PERIOD - 0.3 <= handover <= LEASE_DURATION + 2 * 2.2 * RETRY_PERIOD + 2.0

            processes[follower].send_signal(signal.SIGTERM)  # a clean shutdown releases the Lease
            with anyio.fail_after(30):
                await output.wait_until(lambda: "released" in output.lines[follower])
                assert await processes[follower].wait() == 0
            assert await holder(client, namespace) == ""
        finally:
            for process in processes.values():
                if process.returncode is None:
                    process.kill()
            tg.cancel_scope.cancel()


async def test_losing_the_lease_stops_the_controllers(client: Client, namespace):
    informer = Informer(client, CONFIGMAPS, namespace=namespace)
    reconciled = anyio.Event()

    async def reconcile(key) -> None:
        reconciled.set()

    controller = Controller("test-lost-lease", reconcile)
    controller.watch(informer)
    stopped = anyio.Event()

    async def run_controllers() -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(informer.run)
                tg.start_soon(controller.run)
        finally:
            stopped.set()

    elector = LeaderElector(client, name="lost", namespace=namespace, identity="me",
                            lease_duration=LEASE_DURATION, renew_deadline=RENEW_DEADLINE, retry_period=RETRY_PERIOD)

    async def steal() -> None:
        await reconciled.wait()  # leading, controllers running
        lease = await client.get(LEASES, "lost", namespace)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"].update(holderIdentity="thief", renewTime=now, leaseDurationSeconds=3600)
        await client.update(LEASES, lease)

    async with anyio.create_task_group() as tg:
        tg.start_soon(steal)
        with anyio.fail_after(60), pytest.raises(LeaderElectionLost):
            await elector.run(run_controllers)
    assert stopped.is_set() and controller.queue.shutting_down and not elector.is_leader
    assert await holder(client, namespace, "lost") == "thief"  # a lost lease is not "released"


async def test_a_clean_shutdown_hands_over_at_once(client: Client, namespace):
    first = LeaderElector(client, name="handover", namespace=namespace, identity="first",
                          lease_duration=3600, renew_deadline=10, retry_period=0.5)
    second_sees_first = anyio.Event()
    second = LeaderElector(client, name="handover", namespace=namespace, identity="second",
                           lease_duration=3600, renew_deadline=10, retry_period=0.5,
                           on_new_leader=lambda leader: leader == "first" and second_sees_first.set())
    first_leads, second_leads = anyio.Event(), anyio.Event()

    async def lead_until_cancelled(flag: anyio.Event) -> None:
        flag.set()
        await anyio.sleep_forever()

    first_scope = anyio.CancelScope()
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_run_in, first, first_scope, lambda: lead_until_cancelled(first_leads))
            await first_leads.wait()
            tg.start_soon(second.run, lambda: lead_until_cancelled(second_leads))
            await second_sees_first.wait()
            assert not second.is_leader
            first_scope.cancel()  # the first shuts down cleanly: its 3600 s lease must not hold the second up
            await second_leads.wait()
            tg.cancel_scope.cancel()
    assert await holder(client, namespace, "handover") == ""


async def _run_in(elector: LeaderElector, scope: anyio.CancelScope, leading) -> None:
    with scope:
        await elector.run(leading)
