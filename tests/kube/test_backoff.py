"""The reflector's backoff (kube/reflector.py): doubling with jitter, capped, reset after quiet."""

from __future__ import annotations

from dynamo_snapshot.kube import (
    Backoff,
)
from tests.kube.support import FakeClock


def test_backoff_doubles_from_0_8_to_30_with_jitter_and_resets_after_two_quiet_minutes():
    clock = FakeClock()
    backoff = Backoff(clock=clock)
    delays = []
    for _ in range(10):
        delays.append(backoff.next_delay())
        clock.now += 1
    nominal = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30, 30, 30]
    assert all(n <= d <= n * 1.25 for n, d in zip(nominal, delays, strict=True))
    clock.now += 121  # two healthy minutes
    assert backoff.next_delay() <= 0.8 * 1.25
