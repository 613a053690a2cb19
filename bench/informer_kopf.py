"""One contender of bench/informer.py: a kopf operator watching the same pods.

    KUBECONFIG=... python bench/informer_kopf.py NAMESPACE OBJECTS index|events

Same protocol as informer_ours.py. kopf's closest equivalents of a cache and a queue: an index of every
pod (`@kopf.index`, the whole body kept) and an event handler (`@kopf.on.event`, run by kopf's per-object
workers). Mode `events` leaves the index out (no cache at all). Event posting and cluster scanning are
off; standalone (no peering).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from typing import Any

import kopf

NAMESPACE, N, MODE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
seen = 0


def say(**fields: Any) -> None:
    print(json.dumps({**fields, "t": time.time()}), flush=True)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.posting.enabled = False
    settings.scanning.disabled = True


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_kubeconfig(**kwargs)


if MODE == "index":
    @kopf.index("pods")
    def pods_by_name(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Any]:
        return {(namespace, name): body}


@kopf.on.event("pods")
def on_event(**_: Any) -> None:
    global seen
    seen += 1
    if seen == N:
        say(event="synced")
    elif seen == 2 * N:
        say(event="updated")


async def main() -> None:
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    threading.Thread(target=lambda: [loop.call_soon_threadsafe(lines.put_nowait, line) for line in sys.stdin],
                     daemon=True).start()
    say(event="ready")
    assert (await lines.get()).strip() == "go"
    kopf.configure(quiet=True)
    stop = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(standalone=True, namespaces=[NAMESPACE], clusterwide=False,
                                                 stop_flag=stop))
    await lines.get()  # "quit"
    stop.set()
    await operator


if __name__ == "__main__":
    asyncio.run(main())
