"""The checkpoint lease's liveness rule (who holds it, until when)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from dynamo_snapshot.agent.service.lease import live_holder


def test_a_lease_is_live_until_its_duration_passes_since_renewal():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    lease = {"spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                      "renewTime": (now - timedelta(seconds=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}
    assert live_holder(lease, now) == "a"
    assert live_holder(lease, now + timedelta(seconds=6)) is None
    released = copy.deepcopy(lease)
    released["spec"]["holderIdentity"] = ""
    assert live_holder(released, now) is None
