"""The dev cluster is development-only: without its extra (cryptography), `dynamo-snapshot demo` names the
extra to install and exits 2, and the operator, agent and snapshotctl never need it."""

from __future__ import annotations

import subprocess
import sys

WITHOUT_CRYPTOGRAPHY = "import sys; sys.modules['cryptography'] = None\n"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_CRYPTOGRAPHY + code], capture_output=True, text=True,
                          timeout=60)


def test_the_demo_without_the_devcluster_extra_names_the_extra_and_exits_2():
    result = _python("from dynamo_snapshot.cli.main import main; sys.exit(main(['demo']))")
    assert result.returncode == 2
    assert "pip install 'dynamo-snapshot[devcluster]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_operator_agent_and_snapshotctl_import_without_the_devcluster_extra():
    result = _python("import dynamo_snapshot.controllers.operator, dynamo_snapshot.controllers.entry, "
                     "dynamo_snapshot.agent.service.main, dynamo_snapshot.cli.snapshotctl")
    assert result.returncode == 0, result.stderr
