"""What the checkpoint and restore pipelines share: the request's common fields, and the stage
bookkeeping (a log line and the hooks' ``on_stage`` when a stage starts, its duration when it ends)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from dynamo_snapshot.agent.artifact.authn import Keyring
from dynamo_snapshot.agent.artifact.remote import ObjectStorage
from dynamo_snapshot.agent.pipeline.hooks import Hooks

S = TypeVar("S", bound=enum.StrEnum)


@dataclass(frozen=True)
class Request:
    checkpoint_id: str
    base_path: Path  # the storage's mount: <base>/<checkpointID>/versions/<artifactVersion>
    artifact_version: str = "1"
    io_threads: int | None = None  # digest readers (default: artifact.default_io_threads)
    keyring: Keyring | None = None  # the checkpoint keys (default: authn.default_keyring(), read at the start)
    remote: ObjectStorage | None = None  # S3: base_path is node-local, the version is uploaded/fetched (remote.py)
    namespace: str = ""  # the pod's, as the runtime confirmed it: recorded at a checkpoint, required at a restore


class Stages(Generic[S]):
    def __init__(self, pipeline: str, log: Any, hooks: Hooks):
        self.pipeline = pipeline
        self.log = log
        self.hooks = hooks
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    async def enter(self, stage: S) -> None:
        self._started[stage.value] = time.monotonic()
        self.log.info(f"{self.pipeline} stage", stage=stage.value)
        await self.hooks.on_stage(stage)

    def leave(self, stage: S) -> None:
        self.seconds[stage.value] = time.monotonic() - self._started.pop(stage.value)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
