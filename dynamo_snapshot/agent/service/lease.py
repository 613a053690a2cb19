"""The Lease the agent holds while it checkpoints (SPEC section 4): named after the checkpoint Job, in
the Job's namespace, labelled with the checkpoint ID (the operator watches only such Leases).

The Lease is owned by the Job (garbage-collected with it, should the agent die before deleting it), and
its holder is the agent of the node (``snapshot-agent-<node>``, the same after a restart), so a restarted
agent takes over its own node's Lease at once instead of waiting for its dead predecessor's to expire.

While the Lease is live, a Job that completed without the agent's verdict is waited for instead of
failed. So the agent takes it before the dump, renews it every ``renew_every`` seconds, and gives up the
dump when it can no longer vouch for it: another holder took the Lease, or it went unrenewed for
``renew_deadline`` seconds (shorter than the Lease's duration, so we stop before the operator may decide).

    lease = CheckpointLease(client, namespace, job, checkpoint_id, identity)
    await lease.acquire()          # LeaseUnavailable: another live holder
    async with lease.held():       # renewed until the block ends, then deleted
        with lease.scope:          # cancelled when the Lease is lost
            ...
    lease.lost                     # why, when it was lost
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from dynamo_snapshot.agent.errors import AgentError
from dynamo_snapshot.api import names
from dynamo_snapshot.kube import LEASES, AlreadyExists, Client, Conflict, KubeError, NotFound

log = structlog.get_logger(__name__)


class LeaseUnavailable(AgentError):
    """Another holder has the Lease: someone else is finalizing this checkpoint."""


def _now() -> datetime:
    return datetime.now(UTC)


def _micro_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def live_holder(lease: dict[str, Any], now: datetime) -> str | None:
    """The holder of a Lease that has not expired (by its own renewTime and duration), else None."""
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    if not holder or renewed is None:
        return None
    if (now - renewed).total_seconds() >= (spec.get("leaseDurationSeconds") or 0):
        return None
    return holder


class CheckpointLease:
    def __init__(self, client: Client, namespace: str, job_name: str, checkpoint_id: str, identity: str, *,
                 duration_s: int = 15, renew_every: float = 3.0, renew_deadline: float = 10.0, job_uid: str = ""):
        if not renew_every < renew_deadline < duration_s:
            raise ValueError("a checkpoint Lease needs renew_every < renew_deadline < duration")
        self.client = client
        self.namespace = namespace
        self.name = job_name
        self.checkpoint_id = checkpoint_id
        self.identity = identity
        self.job_uid = job_uid
        self.duration_s = duration_s
        self.renew_every = renew_every
        self.renew_deadline = renew_deadline
        self.scope = anyio.CancelScope()
        self.lost: str | None = None
        self._lease: dict[str, Any] | None = None
        self._log = log.bind(namespace=namespace, name=job_name, checkpoint_id=checkpoint_id, identity=identity)

    def _body(self, existing: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time(_now())
        lease = dict(existing or {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease"})
        metadata = dict(lease.get("metadata") or {"name": self.name, "namespace": self.namespace})
        metadata["labels"] = {**(metadata.get("labels") or {}), names.LABEL_CHECKPOINT_ID: self.checkpoint_id}
        if self.job_uid:
            # Owned by the Job: a Lease an agent could not delete (killed) goes with the Job, not never.
            metadata["ownerReferences"] = [{"apiVersion": "batch/v1", "kind": "Job", "name": self.name,
                                            "uid": self.job_uid}]
        lease["metadata"] = metadata
        spec = dict(lease.get("spec") or {})
        mine = spec.get("holderIdentity") == self.identity
        lease["spec"] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": spec.get("acquireTime") if mine and spec.get("acquireTime") else now,
            "renewTime": now,
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if mine or not existing else 1),
        }
        return lease

    async def acquire(self) -> None:
        """Take the Lease, or raise LeaseUnavailable when another holder's is still live."""
        try:
            existing = await self.client.get(LEASES, self.name, self.namespace)
        except NotFound:
            try:
                self._lease = await self.client.create(LEASES, self._body(None), self.namespace)
            except AlreadyExists as err:
                raise LeaseUnavailable(f"Lease {self.namespace}/{self.name} was created by someone else") from err
        else:
            holder = live_holder(existing, _now())
            if holder not in (None, self.identity):
                raise LeaseUnavailable(f"Lease {self.namespace}/{self.name} is held by {holder}")
            try:
                self._lease = await self.client.update(LEASES, self._body(existing), self.namespace)
            except Conflict as err:
                raise LeaseUnavailable(f"Lease {self.namespace}/{self.name} changed while we took it") from err
        self._log.info("checkpoint lease acquired")

    async def _renew(self) -> None:
        try:
            self._lease = await self.client.update(LEASES, self._body(self._lease), self.namespace)
        except Conflict:
            # Written by someone else since: still ours only if the holder is still us.
            current = await self.client.get(LEASES, self.name, self.namespace)
            if (current.get("spec") or {}).get("holderIdentity") != self.identity:
                raise
            self._lease = await self.client.update(LEASES, self._body(current), self.namespace)

    async def _keep(self) -> None:
        renewed_at = time.monotonic()
        while True:
            await anyio.sleep(self.renew_every)
            try:
                await self._renew()
                renewed_at = time.monotonic()
            except (Conflict, NotFound) as err:
                self._lose(f"Lease {self.namespace}/{self.name} was taken or deleted: {err}")
                return
            except KubeError as err:
                if time.monotonic() - renewed_at >= self.renew_deadline:
                    self._lose(f"Lease {self.namespace}/{self.name} not renewed for {self.renew_deadline:.0f} s: {err}")
                    return
                self._log.warning("checkpoint lease renewal failed; retrying", error=str(err))

    def _lose(self, why: str) -> None:
        self.lost = why
        self._log.error("checkpoint lease lost", reason=why)
        self.scope.cancel()

    async def release(self) -> None:
        """Delete the Lease (the verdict is on the Job by now, or the checkpoint has failed); a lost one
        is someone else's and is left alone."""
        if self._lease is None or self.lost:
            return
        metadata = self._lease.get("metadata") or {}
        # Only the version we wrote last: a Lease someone took meanwhile is not ours to delete.
        preconditions = {"uid": metadata.get("uid", ""), "resourceVersion": metadata.get("resourceVersion", "")}
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.renew_deadline):
            try:
                await self.client.delete(LEASES, self.name, self.namespace, preconditions=preconditions)
                self._log.info("checkpoint lease released")
            except (NotFound, Conflict):
                pass
            except KubeError as err:
                self._log.warning("could not release the checkpoint lease", error=str(err))

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[CheckpointLease]:
        """Keep the acquired Lease renewed while the block runs; release it afterwards."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            await self.release()
