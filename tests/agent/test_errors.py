"""Every error the agent defines derives from the one root, ``agent.errors.AgentError``."""

import importlib
import inspect
import pkgutil

import dynamo_snapshot.agent as agent
from dynamo_snapshot.agent.errors import AgentError


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
