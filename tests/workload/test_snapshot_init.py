"""snapshot-init as PID 1 of a real PID namespace, running as an unprivileged user (nobody, no
capabilities), as in a workload container: it runs the command, forwards signals, reaps orphans,
exits with the workload's status, and in standby adopts a process re-parented to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
LAUNCH = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from dynamo_snapshot.workload.init import main; sys.exit(main())"
)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a PID namespace and drop to nobody"
    for tool in ("unshare", "setpriv", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} is not installed"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def image_dir() -> Iterator[Path]:
    """The workload package laid out as in the placeholder image, readable by nobody."""
    top = Path(tempfile.mkdtemp(prefix="snapshot-init-"))
    top.chmod(0o755)
    package = top / "dynamo_snapshot"
    (package / "workload").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for source in (REPO / "dynamo_snapshot" / "workload").glob("*.py"):
        shutil.copy(source, package / "workload" / source.name)
    for path in [top, *top.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield top
    shutil.rmtree(top)


@pytest.fixture
def control_dir(image_dir: Path) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="control-", dir=image_dir))
    directory.chmod(0o777)
    yield directory
    shutil.rmtree(directory)


def start(image_dir: Path, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """snapshot-init as PID 1 of a new PID namespace, as nobody with no capabilities."""
    argv = [
        "unshare",
        "--pid",
        "--fork",
        "--mount-proc",
        "--",
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        SYSTEM_PYTHON,
        "-c",
        LAUNCH,
        str(image_dir),
        "--",
        *command,
    ]
    environment = {"PATH": "/usr/bin:/bin", **(env or {})}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def init_pid(unshare: subprocess.Popen[str]) -> int:
    """Host PID of snapshot-init: the child unshare forked into the namespace."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("unshare did not start snapshot-init")


def read_line_with(stream, needle: str) -> str:
    for line in stream:
        if needle in line:
            return line
    raise AssertionError(f"stream ended without {needle!r}")


def tell(control_dir: Path, name: str, payload: dict) -> None:
    """Write a control file as the agent does: whole, in one rename (snapshot-init may read it any time)."""
    partial = control_dir / f".{name}.partial"
    partial.write_text(json.dumps(payload))
    partial.rename(control_dir / name)


def py(code: str) -> list[str]:
    return [SYSTEM_PYTHON, "-c", code]


def test_runs_the_workload_unprivileged_above_the_pid_base(image_dir: Path) -> None:
    workload = py(
        "import os\n"
        "try:\n"
        "    fd = os.open('/proc/sys/kernel/ns_last_pid', os.O_WRONLY)\n"
        "    os.write(fd, b'5000')\n"
        "    moved = 'moved'\n"
        "except OSError:\n"
        "    moved = 'denied'\n"
        "print(os.getpid(), os.getuid(), moved)\n"
    )
    proc = start(image_dir, workload)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    pid, uid, moved = out.split()
    assert int(pid) >= 1000, "the workload must start above the PIDs a restore pod uses first"
    assert int(uid) == NOBODY
    assert moved == "denied", "setup: the workload should have no privilege over its PID namespace"


@pytest.mark.parametrize(("code", "status"), [("raise SystemExit(7)", 7), ("import os; os.kill(os.getpid(), 9)", 137)])
def test_exits_with_the_workloads_status(image_dir: Path, code: str, status: int) -> None:
    proc = start(image_dir, py(code))
    proc.communicate(timeout=60)
    assert proc.returncode == status


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_forwards_signals_to_the_workload(image_dir: Path, sig: signal.Signals) -> None:
    workload = py(
        "import signal, sys, time\n"
        f"signal.signal({int(sig)}, lambda *_: sys.exit(40 + {int(sig)}))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = start(image_dir, workload)
    assert proc.stdout is not None
    read_line_with(proc.stdout, "ready")
    os.kill(init_pid(proc), sig)
    proc.wait(timeout=30)
    assert proc.returncode == 40 + int(sig)


def test_reaps_orphaned_processes(image_dir: Path) -> None:
    # The workload leaves a grandchild to be re-parented to init, then waits for it to be reaped:
    # only PID 1 can reap it, and an unreaped zombie keeps its /proc entry.
    script = (
        "import os, sys, time\n"
        "r, w = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    if os.fork() == 0:\n"
        "        os.read(r, 1)\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.waitpid(child, 0)\n"
        "orphans = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]\n"
        "os.write(w, b'x')\n"
        "deadline = time.monotonic() + 20\n"
        "while any(os.path.exists(f'/proc/{p}') for p in orphans):\n"
        "    if time.monotonic() > deadline:\n"
        "        print('zombie', flush=True)\n"
        "        sys.exit(1)\n"
        "    time.sleep(0.01)\n"
        "print('reaped', orphans, flush=True)\n"
    )
    proc = start(image_dir, py(script))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    assert out.startswith("reaped ['"), "setup: no orphan was left to reap"


def test_standby_adopts_the_restored_process_and_exits_with_its_status(image_dir: Path, control_dir: Path) -> None:
    env = {"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": str(control_dir)}
    proc = start(image_dir, ["/bin/false"], env)  # the cold-start command is not run in standby
    assert proc.stderr is not None
    read_line_with(proc.stderr, "standby")
    init = init_pid(proc)
    # What a restore leaves behind: a process in init's PID namespace whose parent exited.
    spawned = subprocess.run(
        [
            "nsenter",
            "--target",
            str(init),
            "--pid",
            "--",
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "/bin/sh",
            "-c",
            "sleep 300 >/dev/null 2>&1 & echo $!",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    restored = int(spawned.stdout)
    tell(control_dir, "restore-complete", {"workloadPID": restored})
    read_line_with(proc.stderr, f"adopted restored workload PID {restored}")
    os.kill(init, signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()


def test_standby_without_a_workload_stops_on_sigterm(image_dir: Path, control_dir: Path) -> None:
    env = {"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": str(control_dir)}
    proc = start(image_dir, [], env)
    assert proc.stderr is not None
    read_line_with(proc.stderr, "standby")
    os.kill(init_pid(proc), signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_refused_restore_starts_the_workload_cold_where_the_pod_falls_back(image_dir: Path,
                                                                             control_dir: Path) -> None:
    env = {"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": str(control_dir),
           "DYN_SNAPSHOT_RESTORE_FALLBACK": "cold"}
    proc = start(image_dir, ["/bin/sh", "-c", "echo started cold; exit 7"], env)
    assert proc.stderr is not None
    read_line_with(proc.stderr, "standby")
    tell(control_dir, "restore-failed", {"reason": "pages-1.img has SHA-256 00"})
    read_line_with(proc.stderr, "pages-1.img has SHA-256 00; starting the workload cold")
    proc.wait(timeout=30)
    assert proc.returncode == 7
    assert proc.stdout is not None and "started cold" in proc.stdout.read()


def test_a_refused_restore_keeps_a_pod_without_fallback_waiting(image_dir: Path, control_dir: Path) -> None:
    env = {"DYN_SNAPSHOT_RESTORE_STANDBY": "1", "DYN_SNAPSHOT_CONTROL_DIR": str(control_dir)}
    proc = start(image_dir, ["/bin/sh", "-c", "echo started cold; exit 7"], env)
    assert proc.stderr is not None
    read_line_with(proc.stderr, "standby")
    tell(control_dir, "restore-failed", {"reason": "made for driver 581"})
    read_line_with(proc.stderr, "made for driver 581; waiting")
    os.kill(init_pid(proc), signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM  # never ran the command, never crashed
    assert proc.stdout is not None and "started cold" not in proc.stdout.read()


@pytest.mark.parametrize(
    ("command", "env", "status"),
    [
        ([], {}, 2),
        (["/nonexistent/worker"], {}, 127),
        ([], {"DYN_SNAPSHOT_RESTORE_STANDBY": "1"}, 2),
    ],
    ids=["no-command", "command-not-found", "standby-without-control-dir"],
)
def test_refuses_to_start_without_what_it_needs(
    image_dir: Path, command: list[str], env: dict[str, str], status: int
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(image_dir), "--", *command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )
    assert proc.returncode == status, proc.stderr
