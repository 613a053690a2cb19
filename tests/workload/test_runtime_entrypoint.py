"""`snapshot-init --runtime-entrypoint`, the placeholder image's ENTRYPOINT: a container that sets only
args, or nothing, runs the wrapped runtime image's ENTRYPOINT and CMD under snapshot-init, by the same
rule a container runtime applies to an image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_snapshot.workload.init import UsageError, runtime_command
from tests.images.support import REPO, layout
from tests.workload.test_snapshot_init import LAUNCH

# A runtime entrypoint in the style of NVIDIA's images: it sets something up, then runs its arguments.
ENTRYPOINT = [sys.executable, "-c",
              "import os, sys; print('entrypoint', flush=True); os.execvp(sys.argv[1], sys.argv[1:])"]
CMD = [sys.executable, "-c", "print('default command')"]


def recorded(tmp_path: Path, entrypoint: object, cmd: object) -> Path:
    path = tmp_path / "runtime-command.json"
    path.write_text(json.dumps({"image": "runtime:1", "entrypoint": entrypoint, "cmd": cmd}))
    return path


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "args", "expected"),
    [
        (["/entry.sh"], ["serve", "--port", "80"], [], ["/entry.sh", "serve", "--port", "80"]),
        (["/entry.sh"], ["serve"], ["python3", "-m", "dynamo.vllm"], ["/entry.sh", "python3", "-m", "dynamo.vllm"]),
        (None, ["python3"], [], ["python3"]),
        (None, ["python3"], ["bash", "-c", "x"], ["bash", "-c", "x"]),
        (["/bin/sh", "-c", "exec vllm $0"], None, ["serve"], ["/bin/sh", "-c", "exec vllm $0", "serve"]),
    ],
    ids=["nothing-set", "args-only", "cmd-only-image", "cmd-only-image-with-args", "shell-form-entrypoint"],
)
def test_follows_the_container_runtimes_rule(tmp_path, entrypoint, cmd, args, expected) -> None:
    assert runtime_command(args, recorded(tmp_path, entrypoint, cmd)) == expected


def test_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"runtime-command.json is missing.*make placeholder-image"):
        runtime_command([], tmp_path / "runtime-command.json")
    with pytest.raises(UsageError, match="runtime:1 has neither ENTRYPOINT nor CMD"):
        runtime_command([], recorded(tmp_path, None, []))
    with pytest.raises(UsageError, match="'cmd' is not a list of strings"):
        runtime_command([], recorded(tmp_path, ["/e"], "serve"))


@pytest.fixture
def image_tree(tmp_path: Path):
    """The placeholder's files as layout.py writes them, with a runtime whose entrypoint runs its args."""
    def build(entrypoint: list[str] | None, cmd: list[str] | None) -> Path:
        layout().write_tree(tmp_path / "root", REPO, "runtime:1", entrypoint or [], cmd or [])
        return tmp_path / "root" / layout().APP_DIR.lstrip("/")
    return build


def run_init(app_dir: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c", LAUNCH, str(app_dir), *argv], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=60)


def test_a_container_without_command_or_args_runs_entrypoint_and_cmd(image_tree) -> None:
    result = run_init(image_tree(ENTRYPOINT, CMD), "--runtime-entrypoint")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["entrypoint", "default command"]


def test_a_container_with_only_args_runs_them_through_the_entrypoint(image_tree) -> None:
    result = run_init(image_tree(ENTRYPOINT, CMD), "--runtime-entrypoint", sys.executable, "-c",
                      "import sys; print('args', sys.argv[1:])", "--", "x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["entrypoint", "args ['--', 'x']"]


def test_a_pod_command_bypasses_the_runtime_entrypoint(image_tree) -> None:
    """The operator puts `snapshot-init --` in front of a pod's command: that command runs as written."""
    result = run_init(image_tree(ENTRYPOINT, CMD), "--", sys.executable, "-c", "print('command')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["command"]


def test_a_restore_pod_stands_by_without_running_the_runtime(image_tree, tmp_path: Path) -> None:
    app = image_tree(ENTRYPOINT, CMD)
    (app / "runtime-command.json").unlink()  # not even needed: a restore pod runs nothing of its own
    control = tmp_path / "control"
    control.mkdir()
    proc = subprocess.Popen([sys.executable, "-I", "-c", LAUNCH, str(app), "--runtime-entrypoint"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": str(control)})
    try:
        assert proc.stderr is not None
        assert "standby" in proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 128 + 15
    assert "entrypoint" not in (proc.stdout.read() if proc.stdout else "")


def test_an_image_without_the_record_fails_with_the_fix(image_tree) -> None:
    app = image_tree(ENTRYPOINT, CMD)
    (app / "runtime-command.json").unlink()
    result = run_init(app, "--runtime-entrypoint")
    assert result.returncode == 2
    assert "is missing, so the runtime image's entrypoint is unknown" in result.stderr
    assert "make placeholder-image" in result.stderr
