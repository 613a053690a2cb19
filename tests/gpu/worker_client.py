"""Starting and talking to the stand-in worker (bench/gpu/worker.py) from the GPU tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("DYN_SNAPSHOT_TEST_PORT", "47631"))
ALLOC = os.environ.get("DYN_SNAPSHOT_TEST_ALLOC", "vmm")


def request(payload: dict[str, Any], timeout: float = 120.0, port: int = PORT) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert reply.get("ok"), f"worker {payload.get('cmd')}: {reply.get('error')}"
    return reply


def wait_ready(timeout: float = 180.0, port: int = PORT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return request({"cmd": "ping"}, timeout=5, port=port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def reap(pid: int) -> None:
    """Kill ``pid`` and wait until it is gone (its PIDs are free for a restore)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(1000):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.01)
    raise TimeoutError(f"PID {pid} did not go away")


def launch(
    argv: list[str], work: Path, log: Path, port: int, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Start a worker in its own session, logging to ``log``; its PID and its answer to ping."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, cwd=work
        )
    try:
        return proc.pid, wait_ready(port=port)
    except BaseException:
        proc.kill()
        raise AssertionError(f"{Path(argv[1]).name} did not start: {log.read_text()[-3000:]}") from None


@dataclass
class Worker:
    pid: int
    log: Path
    weights: Path

    @classmethod
    def start(cls, weights: Path, work: Path, compile: bool = False) -> Worker:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        log = work / "worker.log"
        argv = [
            sys.executable,
            str(REPO / "bench" / "gpu" / "worker.py"),
            "--weights",
            str(weights),
            "--port",
            str(PORT),
            "--alloc",
            ALLOC,
            "--batch-sizes",
            "1,8",
            "--warmup",
            "1",
        ]
        if not compile:
            argv.append("--no-compile")
        pid, _ = launch(argv, work, log, PORT, env)
        return cls(pid, log, weights)

    def state(self) -> dict[str, Any]:
        return request({"cmd": "state"})

    def stop(self) -> None:
        if Path(f"/proc/{self.pid}").exists():
            reap(self.pid)


@dataclass
class MultiWorker:
    """tests/gpu/multi_worker.py: a parent and a child CUDA process, each on its own GPU ordinal."""

    pid: int
    child_pid: int
    port: int
    log: Path

    @classmethod
    def start(cls, work: Path, parent_gpu: int, child_gpu: int, port: int = PORT + 1) -> MultiWorker:
        log = work / "multi-worker.log"
        argv = [
            sys.executable,
            str(REPO / "tests" / "gpu" / "multi_worker.py"),
            "--port",
            str(port),
            "--parent-gpu",
            str(parent_gpu),
            "--child-gpu",
            str(child_gpu),
        ]
        pid, ready = launch(argv, work, log, port)
        return cls(pid, ready["child_pid"], port, log)

    def check(self) -> dict[str, Any]:
        return request({"cmd": "check"}, port=self.port)

    def stop(self) -> None:
        for pid in (self.pid, self.child_pid):
            if Path(f"/proc/{pid}").exists():
                reap(pid)
