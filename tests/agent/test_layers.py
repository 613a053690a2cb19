"""The agent's layers import one way: each subpackage only from the layers before it."""

import ast
from pathlib import Path

import dynamo_snapshot.agent as agent

ROOT = Path(agent.__file__).parent
ALLOWED_OUTSIDE = {"api", "hashing", "kube", "workload", "httpserve", "lifecycle", "logs"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return [n for n in names if n.startswith("dynamo_snapshot.")]


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "agent" and parts[2] in agent.LAYERS else None


def test_no_agent_module_imports_a_layer_above_its_own():
    upward = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        own = rel[0] if rel[0] in agent.LAYERS else None
        rank = agent.LAYERS.index(own) if own else len(agent.LAYERS)
        for name in _imports(path):
            layer = _layer_of(name)
            if layer is not None and agent.LAYERS.index(layer) > rank:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_agent_imports_nothing_of_the_operator_or_the_cli():
    bad = []
    for path in ROOT.rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[1]
            if top != "agent" and top not in ALLOWED_OUTSIDE:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_every_agent_module_sits_in_a_layer():
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name not in {"__init__.py", "errors.py", "tree.py"})
    assert not loose, f"modules outside the layers: {loose}"
