"""A worker of two CUDA processes, the shape of a tensor-parallel inference worker: the parent serves
JSON lines on a TCP port and starts the child (a fresh interpreter, not a fork), which answers over a
pipe. Each keeps a tensor on its own GPU and the results computed from it at start.

    python multi_worker.py --port P --parent-gpu 0 --child-gpu 1

Requests (one JSON object per line): ``{"cmd": "ping"}`` and ``{"cmd": "check"}``; the reply to
``check`` says, for both processes, whether the tensor's bits and a matrix product on it are what they
were, and the child's PID.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys

import torch


class Holder:
    """A tensor on one GPU, its exact bit checksum and the result of a product, taken at start."""

    def __init__(self, ordinal: int):
        self.device = torch.device("cuda", ordinal)
        generator = torch.Generator().manual_seed(1000 + ordinal)
        self.x = torch.randn(2048, 2048, generator=generator).to(self.device)
        self.reference = self.measure()

    def measure(self) -> tuple[int, float]:
        bits = int(self.x.view(torch.int32).to(torch.int64).sum().item())
        product = float((self.x @ self.x).double().sum().item())
        return bits, product

    def check(self) -> dict:
        bits, product = self.measure()
        return {
            "bits_ok": bits == self.reference[0],
            "product_ok": abs(product - self.reference[1]) <= 1e-6 * max(1.0, abs(self.reference[1])),
            "device": self.device.index,
        }


def child(ordinal: int) -> int:
    holder = Holder(ordinal)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            print(json.dumps(holder.check()), flush=True)
    return 0


def parent(port: int, own: int, other: int) -> int:
    holder = Holder(own)
    helper = subprocess.Popen(
        [sys.executable, __file__, "--child", str(other)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert json.loads(helper.stdout.readline())["ready"]
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            request = json.loads(stream.readline())
            reply: dict = {"ok": True, "child_pid": helper.pid}
            if request.get("cmd") == "check":
                helper.stdin.write("check\n")
                helper.stdin.flush()
                reply["parent"] = holder.check()
                reply["child"] = json.loads(helper.stdout.readline())
            stream.write(json.dumps(reply) + "\n")
            stream.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--parent-gpu", type=int, default=0)
    parser.add_argument("--child-gpu", type=int, default=1)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    return parent(args.port, args.parent_gpu, args.child_gpu)


if __name__ == "__main__":
    sys.exit(main())
