"""One checkpoint key directory for a whole test session (agents started by tests inherit it through the
environment). Shared by the root conftest and the GPU tests' conftest, which runs without the root one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def ensure_session_keys() -> None:
    from dynamo_snapshot.agent.artifact import authn

    if authn.KEY_DIRECTORY_ENV not in os.environ:
        directory = Path(tempfile.mkdtemp(prefix="snapshot-test-keys-"))
        authn.create_key(directory, "k-test")
        os.environ[authn.KEY_DIRECTORY_ENV] = str(directory)
