"""Runs the checkpoint pipeline in its own process and parks it at one stage, so a test can kill it
there:

    python checkpoint_driver.py SOCKET CONTAINER_ID BASE CHECKPOINT_ID STAGE

Prints ``at <stage>`` on stdout when the pipeline reaches STAGE, then waits forever.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import structlog

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.container.runtime import CRIClient
from dynamo_snapshot.agent.pipeline import checkpoint


async def main(socket: str, container_id: str, base: str, checkpoint_id: str, stop_at: str) -> None:
    async def observer(stage: checkpoint.Stage) -> None:
        if stage.value == stop_at:
            print(f"at {stage.value}", flush=True)
            await anyio.sleep_forever()

    async with CRIClient(socket) as cri:
        request = checkpoint.CheckpointRequest(container_id, checkpoint_id, Path(base))
        await checkpoint.checkpoint(cri, request, criu.CriuBundle.locate(), observer=observer)
    print("finished", flush=True)


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the protocol
    anyio.run(main, *sys.argv[1:6])
