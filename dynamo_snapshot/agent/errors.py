"""Errors of the node agent, under one root (``AgentError``). Each message names the object and the
cause. Errors that belong to one module are defined there, derived from ``AgentError`` (CRIError,
CgroupError, InRootError, CRIStubsUnavailable, GpuMismatch, ConfigError, LeaseUnavailable,
CheckpointAborted); those the pipelines share are here.

A restore failure either may pass on a fresh container (CRIU failed, the manifest is not there yet, the
agent was interrupted) or never will for this checkpoint in this pod: the artifact is altered or
unauthenticated, made for another node, or would exceed the pod's privilege
(``service.operations.refused_for_good`` tells them apart)."""

from __future__ import annotations


class AgentError(RuntimeError):
    """The root of every error the agent raises on purpose."""


class SnapshotError(AgentError):
    """Base class for checkpoint and restore failures on the node."""


class CheckpointError(SnapshotError):
    pass


class RestoreError(SnapshotError):
    pass


class ArtifactInvalid(RestoreError):
    """The artifact on storage is incomplete, altered, or not the checkpoint that was asked for."""


class ArtifactMissing(ArtifactInvalid):
    """The version's manifest is not (yet) on storage: a retry on a fresh container may find it."""


class RestoreExceedsPrivilege(RestoreError):
    """The images would give a restored thread more privilege than the placeholder container has."""


class ArtifactIncompatible(ArtifactInvalid):
    """The artifact is intact but was made by a CRIU, kernel architecture or driver this node cannot use."""


class CriuFailed(SnapshotError):
    """CRIU exited non-zero; carries the tail of its log."""

    def __init__(self, action: str, returncode: int, log_tail: str, log_path: str | None):
        super().__init__(action, returncode, log_tail, log_path)
        self.action = action
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path  # updated when the log is moved out of a discarded staging directory

    def __str__(self) -> str:
        where = f" (full log: {self.log_path})" if self.log_path else ""
        return f"criu {self.action} failed with exit code {self.returncode}{where}:\n{self.log_tail}"

