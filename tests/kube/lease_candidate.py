"""A leader-election candidate in a process of its own, for tests/kube/test_leaderelection.py.

    python -m tests.kube.lease_candidate KUBECONFIG NAMESPACE LEASE IDENTITY DURATION RENEW RETRY

Prints one line per event on stdout: `leader <holder>` when it sees a new holder, `leading` when it
becomes the leader, `released` after a clean shutdown (SIGTERM). Logs go to stderr.
"""

from __future__ import annotations

import signal
import sys

import anyio
import structlog

from dynamo_snapshot.kube import Client, LeaderElector, load_kubeconfig


def say(*words: str) -> None:
    print(*words, flush=True)


async def main(kubeconfig: str, namespace: str, lease: str, identity: str, duration: str, renew: str,
               retry: str) -> None:
    async with Client(load_kubeconfig(kubeconfig)) as client:
        elector = LeaderElector(client, name=lease, namespace=namespace, identity=identity,
                                lease_duration=float(duration), renew_deadline=float(renew),
                                retry_period=float(retry), on_new_leader=lambda holder: say("leader", holder or "-"))

        async def leading() -> None:
            say("leading")
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            async def stop_on_sigterm() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()

            tg.start_soon(stop_on_sigterm)
            await elector.run(leading)
    say("released")


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    anyio.run(main, *sys.argv[1:8])
