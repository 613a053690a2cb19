"""Every error the agent defines derives from the one root, ``agent.errors.AgentError``; restore failures
are told apart by whether a fresh container could pass."""

import importlib
import inspect
import pkgutil

import dynamo_snapshot.agent as agent
from dynamo_snapshot.agent.cuda.devices import GpuMismatch
from dynamo_snapshot.agent.errors import (
    AgentError,
    ArtifactIncompatible,
    ArtifactInvalid,
    ArtifactMissing,
    CriuFailed,
    RestoreError,
    RestoreExceedsPrivilege,
)
from dynamo_snapshot.agent.service.operations import refused_for_good


def _agent_modules():
    for info in pkgutil.walk_packages(agent.__path__, "dynamo_snapshot.agent."):
        if "._cri" in info.name:  # generated gRPC stubs
            continue
        yield importlib.import_module(info.name)


def test_every_exception_class_of_the_agent_derives_from_agent_error():
    strays = []
    for module in _agent_modules():
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
                    and not issubclass(value, AgentError)):
                strays.append(f"{module.__name__}.{name}")
    assert strays == []


def test_only_failures_a_fresh_container_would_meet_again_are_refused_for_good():
    assert refused_for_good(ArtifactInvalid("pages-1.img has SHA-256 00; the manifest says ff"))
    assert refused_for_good(ArtifactIncompatible("checkpoint cannot be restored here: driver 581 vs 580"))
    assert refused_for_good(RestoreExceedsPrivilege("core-1000.img would restore a thread with more privilege"))
    assert refused_for_good(GpuMismatch("the checkpoint used 2 GPUs; this container sees 1"))
    assert not refused_for_good(ArtifactMissing("manifest.json is missing: the checkpoint was never completed"))
    assert not refused_for_good(CriuFailed("restore", 1, "Error (criu/cr-restore.c)", None))
    assert not refused_for_good(RestoreError("the restore of container main was interrupted"))
