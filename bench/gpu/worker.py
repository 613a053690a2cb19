"""Stand-in inference worker for the GPU benchmark and the GPU tests.

Cold start: import torch, read the weights from a safetensors file into the device (parallel reader,
pinned buffers), build a SwiGLU MLP stack over them, ``torch.compile(mode="reduce-overhead")``
warmed on several batch sizes (CUDA graphs), one explicitly captured CUDA graph, reference
checksums; then it serves a line-JSON protocol on a TCP port (one request per connection):

    {"cmd": "ping"}                      -> pid, cold-start timings
    {"cmd": "state"}                     -> weight checksum, output checksum per batch size (compiled
                                            model, graph replays), explicit graph replay checksum
    {"cmd": "prepare", "empty_cache": b, "release_weights": b}
                                         -> before a checkpoint: stop GPU helper processes
                                            (dynamo_snapshot.workload), optionally free allocator
                                            caches and release the weights' device memory
    {"cmd": "after_restore"}             -> map the weights' memory again and reload them from the file
    {"cmd": "fork_helper"}               -> fork a child that inherits the NVIDIA mappings (a helper
                                            the agent must refuse); {"cmd": "kill_helper"} ends it
    {"cmd": "spin", "ms": n}             -> keep the GPU busy for n ms (a lock-timeout test)

The weights' device memory is a VMM range (``--alloc vmm``) that can be released and mapped again
at the same address, or a plain allocation (``--alloc torch``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import weights as wts  # noqa: E402

from dynamo_snapshot import workload  # noqa: E402

T_IMPORT = time.perf_counter()


class Block(nn.Module):
    def __init__(self, p: dict[str, torch.Tensor], prefix: str):
        super().__init__()
        for name in ("norm", "gate", "up", "down"):
            setattr(self, name, nn.Parameter(p[f"{prefix}.{name}"], requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.norm
        a = F.silu(h @ self.gate.t()) * (h @ self.up.t())
        return x + a @ self.down.t()


class Model(nn.Module):
    def __init__(self, p: dict[str, torch.Tensor], blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(p, f"blocks.{i}") for i in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def checksum(t: torch.Tensor) -> int:
    """Exact, order-sensitive-enough integer checksum of a bf16 tensor's bits."""
    bits = t.contiguous().view(torch.int16).flatten()
    weights = (torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 7919) + 1
    return (
        int((bits.to(torch.int64) * weights).sum().item())
        if bits.numel() <= (1 << 26)
        else int(bits.sum(dtype=torch.int64).item())
    )


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.timings: dict[str, float] = {"import_s": T_IMPORT - T0}
        self.helper_pid: int | None = None
        started = time.perf_counter()
        self.file = wts.read_header(args.weights)
        self.buffer = wts.DeviceBuffer(self.file.data_bytes, mode=args.alloc)
        self.load_stats = wts.load(self.file, self.buffer.tensor, threads=args.load_threads)
        params = self.buffer.views(self.file)
        blocks = len([n for n in params if n.endswith(".gate")])
        self.model = Model(params, blocks).eval()
        self.timings["load_s"] = time.perf_counter() - started
        self.timings["load_gbps"] = self.load_stats.gbps
        self.hidden = params["blocks.0.norm"].shape[0]
        self.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        gen = torch.Generator(device="cuda").manual_seed(1234)
        self.inputs = {
            bs: torch.randn(bs, self.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            for bs in self.batch_sizes
        }

        started = time.perf_counter()
        self.forward = self.model
        if args.compile:
            self.forward = torch.compile(self.model, mode="reduce-overhead")
        with torch.inference_mode():
            for bs in self.batch_sizes:
                for _ in range(3):  # reduce-overhead records a CUDA graph after warm-up runs
                    self.forward(self.inputs[bs]).clone()
        torch.cuda.synchronize()
        self.timings["compile_and_graphs_s"] = time.perf_counter() - started

        started = time.perf_counter()
        self.graph_in = torch.randn(8, self.hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        block0 = self.model.blocks[0]
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    block0(self.graph_in)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.graph_out = block0(self.graph_in)
        for _ in range(args.warmup):
            self.run_all()
        torch.cuda.synchronize()
        self.timings["graph_and_warmup_s"] = time.perf_counter() - started
        self.reference = self.state()
        self.timings["ready_s"] = time.perf_counter() - T0

    def run_all(self) -> dict[str, int]:
        out = {}
        with torch.inference_mode():
            for bs in self.batch_sizes:
                out[str(bs)] = checksum(self.forward(self.inputs[bs]).clone())
            self.graph.replay()
            out["graph"] = checksum(self.graph_out)
        return out

    def weights_checksum(self) -> int:
        total = 0
        for t in self.file.tensors:
            view = self.buffer.tensor[t.begin : t.end].view(torch.int16)
            total += int(view.sum(dtype=torch.int64).item()) * 31 + int(view[::4099].sum(dtype=torch.int64).item())
        return total

    def state(self) -> dict[str, object]:
        started = time.perf_counter()
        out = {"weights": self.weights_checksum(), "outputs": self.run_all()}
        out["state_s"] = time.perf_counter() - started
        return out

    def memory(self) -> dict[str, int]:
        free, total = torch.cuda.mem_get_info()
        rss = 0
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return {
            "device_used": total - free,
            "torch_reserved": torch.cuda.memory_reserved(),
            "torch_allocated": torch.cuda.memory_allocated(),
            "host_rss": rss,
        }

    # -- commands --------------------------------------------------------------------------------

    def cmd_ping(self, _: dict) -> dict:
        return {"pid": os.getpid(), "timings": self.timings, "memory": self.memory()}

    def cmd_state(self, _: dict) -> dict:
        state = self.state()
        return {
            **state,
            "matches_reference": state["weights"] == self.reference["weights"]
            and state["outputs"] == self.reference["outputs"],
        }

    def cmd_prepare(self, req: dict) -> dict:
        before = self.memory()
        stopped = workload.stop_gpu_helpers() if req.get("stop_helpers", True) else []
        gc.collect()
        torch.cuda.synchronize()
        if req.get("empty_cache"):  # what a worker can drop: allocator caches, free heap
            torch.cuda.empty_cache()
            wts.empty_host_cache()
            workload.trim_host_memory()
        if req.get("release_weights"):
            self.buffer.release()
        return {
            "stopped_helpers": stopped,
            "before": before,
            "after": self.memory(),
            "gpu_descendants": workload.gpu_descendants(),
        }

    def cmd_after_restore(self, _: dict) -> dict:
        if self.buffer.mapped:
            return {"reloaded": False}
        started = time.perf_counter()
        self.buffer.map()
        stats = wts.load(self.file, self.buffer.tensor, threads=self.args.load_threads)
        torch.cuda.synchronize()
        return {
            "reloaded": True,
            "reload_s": time.perf_counter() - started,
            "load_gbps": stats.gbps,
            "reserved_again": self.buffer.reserved_again,
        }

    def cmd_fork_helper(self, _: dict) -> dict:
        pid = os.fork()
        if pid == 0:  # a helper that inherited the CUDA mappings but never uses CUDA
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:
                time.sleep(60)
        self.helper_pid = pid
        return {"helper_pid": pid}

    def cmd_kill_helper(self, _: dict) -> dict:
        if self.helper_pid:
            os.kill(self.helper_pid, signal.SIGKILL)
            os.waitpid(self.helper_pid, 0)
        pid, self.helper_pid = self.helper_pid, None
        return {"killed": pid}

    def cmd_spin(self, req: dict) -> dict:
        """Queue about ``ms`` of matmuls and wait for them in one call, in the background: while that
        call runs the process cannot be CUDA-locked (a lock-timeout test)."""
        ms = float(req.get("ms", 3000))

        def spin() -> None:
            a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                for _ in range(int(ms / 1.4) + 1):  # one 8192^3 bf16 product takes about 1.4 ms on an H200
                    a = (a @ a).clamp_(-1, 1)
                torch.cuda.synchronize()

        threading.Thread(target=spin, name="spin", daemon=True).start()
        return {"spinning_ms": ms}

    @staticmethod
    def await_outcome() -> None:
        """The workload contract beside the server: the checkpointed source exits 0 (its pod's Job completes
        and hands its GPU back); a restored copy learns restore-complete and serves on."""
        outcome = workload.wait_for_outcome()
        print(json.dumps({"event": outcome.name.lower().replace("_", "-"), "pid": os.getpid()}), flush=True)
        if outcome is workload.Outcome.SNAPSHOT_COMPLETE:
            os._exit(0)

    def serve(self, port: int, host: str = "127.0.0.1", mark_ready: bool = False) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, port))
        server.listen(16)
        print(json.dumps({"event": "ready", "pid": os.getpid(), "timings": self.timings}), flush=True)
        if mark_ready and workload.enabled() and not workload.restore_standby():
            # a checkpoint source pod: compile helpers stopped, then the agent is told (the pod's flow)
            workload.mark_ready_for_snapshot(reread_after_restore=[str(self.args.weights)])
            print(json.dumps({"event": "ready-for-snapshot", "pid": os.getpid()}), flush=True)
            threading.Thread(target=self.await_outcome, name="outcome", daemon=True).start()
        while True:
            conn, _ = server.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                try:
                    req = json.loads(data or b"{}")
                    if req.get("cmd") == "exit":
                        conn.sendall(b'{"ok": true}\n')
                        os._exit(0)
                    handler = getattr(self, f"cmd_{req.get('cmd')}")
                    reply = {"ok": True, **handler(req)}
                except Exception as exc:  # report, keep serving
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                conn.sendall(json.dumps(reply).encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--alloc", choices=["vmm", "torch"], default="vmm")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--load-threads", type=int, default=16)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 in a pod)")
    parser.add_argument("--mark-ready", action="store_true",
                        help="in a checkpoint source pod, tell the agent once warmed up (dynamo_snapshot.workload)")
    args = parser.parse_args()
    Worker(args).serve(args.port, args.host, args.mark_ready)


if __name__ == "__main__":
    main()
