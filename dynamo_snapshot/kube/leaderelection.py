"""Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `tools/leaderelection`.

    elector = LeaderElector(client, name="dynamo-snapshot-operator", namespace="dynamo-system")
    await elector.run(run_controllers)      # run_controllers() runs only while we lead

- Candidates try to acquire the Lease every `retry_period` (jittered). A Lease held by another identity
  is taken only after it has not changed for `lease_duration` seconds, measured on the candidate's own
  clock from when it saw the last change (no trust in other machines' clocks).
- The leader renews every `retry_period`; if it cannot renew for `renew_deadline` seconds it stops
  leading: `leading()` is cancelled and `run` raises LeaderElectionLost (the process should exit and
  start over, as controller-runtime's managers do). renew_deadline < lease_duration keeps the old leader's
  stop before anyone else's start.
- When `leading()` returns or `run` is cancelled (a clean shutdown), the Lease is released (holder
  cleared) so a successor takes over at once instead of waiting out the lease.
Defaults: 15 s / 10 s / 2 s.
"""

from __future__ import annotations

import math
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from dynamo_snapshot.kube.client import Client
from dynamo_snapshot.kube.errors import Conflict, KubeError, NotFound
from dynamo_snapshot.kube.resources import LEASES

__all__ = ["LeaderElectionLost", "LeaderElector", "default_identity"]

log = structlog.get_logger("dynamo_snapshot.kube.leaderelection")
_JITTER = 1.2


class LeaderElectionLost(KubeError):
    """The Lease could not be renewed in time (or another holder took it): we no longer lead."""


def default_identity() -> str:
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, client: Client, *, name: str, namespace: str, identity: str | None = None,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 release_on_cancel: bool = True,
                 on_started_leading: Callable[[], None] | None = None,
                 on_stopped_leading: Callable[[], None] | None = None,
                 on_new_leader: Callable[[str], None] | None = None):
        if lease_duration <= renew_deadline:
            raise ValueError("lease_duration must be greater than renew_deadline")
        if renew_deadline <= _JITTER * retry_period:
            raise ValueError(f"renew_deadline must be greater than {_JITTER} * retry_period")
        self.client = client
        self.name = name
        self.namespace = namespace
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.release_on_cancel = release_on_cancel
        self.on_started_leading = on_started_leading
        self.on_stopped_leading = on_stopped_leading
        self.on_new_leader = on_new_leader
        self.is_leader = False
        self.leader: str = ""  # the holder last seen
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._log = log.bind(lease=f"{namespace}/{name}", identity=self.identity)

    # -- the protocol ----------------------------------------------------------------------------------
    def _observe(self, spec: dict[str, Any]) -> None:
        record = (spec.get("holderIdentity") or "", spec.get("renewTime"), spec.get("acquireTime"),
                  spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
            holder = record[0]
            if holder != self.leader:
                self.leader = holder
                self._log.info("new leader observed", leader=holder or "(none)")
                if self.on_new_leader is not None:
                    self.on_new_leader(holder)

    def _expired(self, spec: dict[str, Any]) -> bool:
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        return time.monotonic() >= self._observed_at + duration

    def _spec(self, acquire_time: str, transitions: int) -> dict[str, Any]:
        now = _now()
        return {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, math.ceil(self.lease_duration)),
                "acquireTime": acquire_time or now, "renewTime": now, "leaseTransitions": transitions}

    async def _try_acquire_or_renew(self) -> bool:
        try:
            try:
                lease = await self.client.get(LEASES, self.name, self.namespace)
            except NotFound:
                body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": self.name, "namespace": self.namespace},
                        "spec": self._spec("", 0)}
                try:
                    created = await self.client.create(LEASES, body, self.namespace)
                except Conflict:  # someone else created it first (AlreadyExists is a Conflict)
                    return False
                self._observe(created["spec"])
                return True
            spec = lease.get("spec") or {}
            self._observe(spec)
            holder = spec.get("holderIdentity") or ""
            if holder and holder != self.identity and not self._expired(spec):
                return False
            transitions = int(spec.get("leaseTransitions") or 0)
            if holder == self.identity:
                lease["spec"] = self._spec(spec.get("acquireTime") or "", transitions)
            else:
                lease["spec"] = self._spec("", transitions + 1)
            try:
                updated = await self.client.update(LEASES, lease, self.namespace)
            except Conflict:  # someone else wrote it since we read it
                return False
            self._observe(updated["spec"])
            return True
        except KubeError as err:
            self._log.warning("lease request failed", error=str(err))
            return False

    async def _acquire(self) -> None:
        self._log.info("trying to acquire lease")
        # Expiry is the absence of change for a duration: only a clock can tell it, so this is a timed retry.
        while not await self._try_acquire_or_renew():  # noqa: ASYNC110
            await anyio.sleep(self.retry_period * (1 + _JITTER * random.random()))

    async def _renew_until_lost(self) -> None:
        """Renew every retry_period; return when renewal has failed for renew_deadline."""
        while True:
            await anyio.sleep(self.retry_period)
            deadline = time.monotonic() + self.renew_deadline
            renewed = False
            while not renewed:
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    renewed = await self._try_acquire_or_renew()
                if renewed:
                    break
                if time.monotonic() >= deadline:
                    return
                await anyio.sleep(min(self.retry_period, max(0.0, deadline - time.monotonic())))

    async def _release(self) -> None:
        try:
            lease = await self.client.get(LEASES, self.name, self.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            now = _now()
            lease["spec"] = {"leaseDurationSeconds": 1, "acquireTime": now, "renewTime": now,
                             "leaseTransitions": int(spec.get("leaseTransitions") or 0)}
            await self.client.update(LEASES, lease, self.namespace)
            self._log.info("lease released")
        except KubeError as err:
            self._log.warning("could not release lease", error=str(err))

    # -- running -------------------------------------------------------------------------------------
    async def run(self, leading: Callable[[], Awaitable[None]]) -> None:
        """Acquire the Lease, then run `leading()` while renewing it.

        Returns when `leading()` returns (releasing the Lease); raises LeaderElectionLost when the Lease
        could not be renewed (after cancelling `leading()`); cancelling `run` releases the Lease."""
        await self._acquire()
        self.is_leader = True
        self._log.info("became leader")
        if self.on_started_leading is not None:
            self.on_started_leading()
        lost = False
        try:
            async with anyio.create_task_group() as tg:
                async def lead() -> None:
                    await leading()
                    tg.cancel_scope.cancel()

                tg.start_soon(lead)
                await self._renew_until_lost()
                lost = True
                tg.cancel_scope.cancel()
        finally:
            self.is_leader = False
            self._log.info("stopped leading", lost=lost)
            if self.on_stopped_leading is not None:
                self.on_stopped_leading()
            if not lost and self.release_on_cancel:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.renew_deadline):
                    await self._release()
        if lost:
            raise LeaderElectionLost(f"lost lease {self.namespace}/{self.name}: not renewed within "
                                     f"{self.renew_deadline}s (holder now {self.leader or 'unknown'})")
