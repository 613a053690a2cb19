"""Runs the checkpoint pipeline in its own process and parks it at one stage, so a test can kill it
there:

    python checkpoint_driver.py SOCKET CONTAINER_ID BASE CHECKPOINT_ID STAGE [AGENT_CONFIG]

With AGENT_CONFIG (an agent configuration file with ``storage.type: s3``) the version is uploaded too.

Prints ``at <stage>`` on stdout when the pipeline reaches STAGE, then waits forever.
"""

from __future__ import annotations

import enum
import sys
from pathlib import Path

import anyio
import structlog

from dynamo_snapshot.agent.container import criu
from dynamo_snapshot.agent.container.runtime import CRIClient
from dynamo_snapshot.agent.pipeline import checkpoint
from dynamo_snapshot.agent.pipeline.containers import ContainerTarget
from dynamo_snapshot.agent.pipeline.hooks import Hooks


def _remote(config: str | None):
    from dynamo_snapshot.agent.service import config as agent_config
    from dynamo_snapshot.agent.service.storageconfig import credentials, object_storage

    s3 = agent_config.load(config).storage.s3 if config else None
    return object_storage(s3, credentials(s3, {})) if s3 else None


async def main(socket: str, container_id: str, base: str, checkpoint_id: str, stop_at: str,
               config: str | None = None) -> None:
    class Park(Hooks):
        async def on_stage(self, stage: enum.StrEnum) -> None:
            if stage.value == stop_at:
                print(f"at {stage.value}", flush=True)
                await anyio.sleep_forever()

    async with CRIClient(socket) as cri:
        request = checkpoint.CheckpointRequest(checkpoint_id, Path(base), remote=_remote(config))
        target = ContainerTarget(cri, container_id)
        await checkpoint.checkpoint(target, request, criu.CriuBundle.locate(), hooks=Park())
    print("finished", flush=True)


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the protocol
    anyio.run(main, *sys.argv[1:7])
