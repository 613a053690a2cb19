"""One contender of bench/informer.py: dynamo_snapshot.kube's reflector + store + work queue over pods.

    python bench/informer_ours.py KUBECONFIG NAMESPACE OBJECTS dicts|structs

Protocol (stdin/stdout, one JSON object a line): prints {"ready"} after imports and connecting; on "go"
it starts the informer; prints {"synced"} when a worker has taken every object's key off the queue, and
{"updated"} when it has taken OBJECTS more (one update per object); exits on "quit".
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import anyio
import msgspec
import structlog

from dynamo_snapshot.api import ObjectMeta
from dynamo_snapshot.kube import PODS, Client, Informer, WorkQueue, load_kubeconfig, store_key


class Container(msgspec.Struct):
    name: str
    image: str = ""


class LeanPodSpec(msgspec.Struct, rename="camel"):
    node_name: str = ""
    containers: list[Container] = []


class LeanPodStatus(msgspec.Struct):
    phase: str = ""


class LeanPod(msgspec.Struct):
    """What a node agent needs of a pod: metadata, node, containers, phase. Everything else is never kept."""

    metadata: ObjectMeta
    spec: LeanPodSpec = msgspec.field(default_factory=LeanPodSpec)
    status: LeanPodStatus = msgspec.field(default_factory=LeanPodStatus)


def say(**fields: Any) -> None:
    print(json.dumps({**fields, "t": time.time()}), flush=True)


async def main(kubeconfig: str, namespace: str, objects: str, mode: str) -> None:
    n = int(objects)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    stdin = anyio.wrap_file(sys.stdin)
    async with Client(load_kubeconfig(kubeconfig)) as client:
        await client.server_version()
        queue: WorkQueue[str] = WorkQueue()
        informer: Informer[Any] = Informer(client, PODS, namespace=namespace,
                                           type=LeanPod if mode == "structs" else Any)
        informer.add_handler(on_add=lambda o: queue.add(store_key(o)),
                             on_update=lambda old, new: queue.add(store_key(new)),
                             on_delete=lambda o: queue.add(store_key(o)))
        say(event="ready")
        assert (await stdin.readline()).strip() == "go"

        async def worker() -> None:
            taken = 0
            while True:
                key = await queue.get()
                queue.done(key)
                taken += 1
                if taken == n:
                    say(event="synced", cached=len(informer.store))
                elif taken == 2 * n:
                    say(event="updated")

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            tg.start_soon(informer.run)
            await stdin.readline()  # "quit"
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
