"""The operator sits on api, hashing and kube only: nothing under dynamo_snapshot/controllers imports the
command line, the agent or the dev cluster (those are above it or beside it)."""

from __future__ import annotations

import ast
from pathlib import Path

import dynamo_snapshot.controllers

ABOVE_OR_BESIDE = ("dynamo_snapshot.cli", "dynamo_snapshot.agent", "dynamo_snapshot.devcluster")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_no_controllers_module_imports_the_cli_the_agent_or_the_dev_cluster():
    root = Path(dynamo_snapshot.controllers.__file__).parent
    upward = [f"{path.relative_to(root)}: {name}" for path in sorted(root.rglob("*.py"))
              for name in _imports(path) if name.startswith(ABOVE_OR_BESIDE)]
    assert upward == []
