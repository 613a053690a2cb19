"""An unmodified Hugging Face transformers server, for the GPU benchmark (bench/gpu/hf_run.py).

Nothing of the project is in it (stdlib, torch, transformers, safetensors): no snapshot hooks, no
released weights. It is what a user's worker looks like when checkpointed as it is.

Stages (the ``ready`` line on stdout and ``ping`` give their times):

    import    torch, transformers
    load      AutoModelForCausalLM.from_pretrained(--model) in bf16 onto --device
    warm-up   one greedy generate of the two fixed prompts with a static KV cache: on CUDA
              transformers compiles the decode step itself (torch.compile, reduce-overhead: CUDA
              graphs); if that fails, eager with the static cache, then eager with the dynamic
              cache (``mode`` says which ran, ``fallback_errors`` why)
    serve     one JSON request per TCP connection, one JSON line back:

    {"cmd": "ping"}   -> pid, timings, mode, memory
    {"cmd": "state"}  -> checksums of a few weight tensors, the greedy token ids for each prompt
    {"cmd": "exit"}   -> the process exits

The prompts are fixed lists of token ids (no tokenizer). Run ``--device cpu`` with a tiny model
(bench/gpu/hf_model.py --layers 2 --hidden 64 ...) for a smoke test; on CPU transformers does not
compile, so the mode there is ``eager-static``.
"""

from __future__ import annotations

import argparse
import json
import os
import socketserver
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

T_IMPORT = time.perf_counter()

PROMPTS = (
    (128000, 791, 4062, 14198, 39935, 35308, 927, 279),
    (128000, 40, 1097, 264, 3544, 4221, 1646, 13),
)
CHECKSUMMED = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.{last}.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight")
MODES = ("compiled-static", "eager-static", "eager-dynamic")


class Server:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.timings: dict[str, float] = {"import_s": T_IMPORT - T0}
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map=args.device)
        self.model.eval()
        self.sync()
        self.timings["load_s"] = time.perf_counter() - started
        vocab = self.model.config.vocab_size
        self.prompts = torch.tensor([[t % vocab for t in p] for p in PROMPTS], device=args.device)
        gen = self.model.generation_config
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
        gen.max_new_tokens, gen.eos_token_id, gen.pad_token_id = args.new_tokens, None, 0
        self.mode, self.fallback_errors = "", []
        started = time.perf_counter()
        self.warmup_tokens = self.warm_up()
        self.timings["warmup_s"] = time.perf_counter() - started
        self.timings["ready_s"] = time.perf_counter() - T0

    def sync(self) -> None:
        if torch.cuda.is_available() and self.args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def warm_up(self) -> list[list[int]]:
        """The first greedy generate, in the first mode that works."""
        gen = self.model.generation_config
        for mode in MODES:
            gen.cache_implementation = None if mode == "eager-dynamic" else "static"
            gen.disable_compile = mode != "compiled-static"
            try:
                tokens = self.generate()
            except Exception as exc:  # recorded in ping and the ready line; the next mode is tried
                self.fallback_errors.append(f"{mode}: {type(exc).__name__}: {str(exc)[:1500]}")
                torch._dynamo.reset()
                continue
            self.mode = mode
            return tokens
        raise RuntimeError(f"no generate mode worked: {self.fallback_errors}")

    def generate(self) -> list[list[int]]:
        with torch.inference_mode():
            out = self.model.generate(input_ids=self.prompts, attention_mask=torch.ones_like(self.prompts))
        self.sync()
        return out[:, self.prompts.shape[1]:].tolist()

    def checksums(self) -> dict[str, int]:
        params = dict(self.model.named_parameters())
        last = self.model.config.num_hidden_layers - 1
        out = {}
        for pattern in CHECKSUMMED:
            name = pattern.format(last=last)
            if name not in params:
                continue
            bits = params[name].detach().contiguous().view(torch.int16).flatten()
            out[name] = int(bits.sum(dtype=torch.int64).item()) * 31 + int(bits[::4099].sum(dtype=torch.int64).item())
        return out

    def memory(self) -> dict[str, int]:
        info = {"device_used": 0, "torch_reserved": 0, "torch_allocated": 0}
        if self.args.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            info = {"device_used": total - free, "torch_reserved": torch.cuda.memory_reserved(),
                    "torch_allocated": torch.cuda.memory_allocated()}
        with open("/proc/self/status") as status:
            rss = next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:")), 0)
        return {**info, "host_rss": rss}

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "timings": self.timings, "mode": self.mode, "compiled": self.compiled(),
                "fallback_errors": self.fallback_errors, "memory": self.memory(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}

    def compiled(self) -> bool:
        return getattr(self.model, "_compiled_call", None) is not None

    def state(self) -> dict[str, Any]:
        started = time.perf_counter()
        tokens = self.generate()
        generate_s = time.perf_counter() - started
        return {"checksums": self.checksums(), "tokens": tokens, "generate_s": generate_s,
                "state_s": time.perf_counter() - started}

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True, **self.ping()}
        if cmd == "state":
            return {"ok": True, **self.state()}
        return {"ok": False, "error": f"unknown cmd {cmd!r}: expected ping, state or exit"}


def serve(server: Server, host: str, port: int) -> None:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                request = json.loads(self.rfile.readline() or b"{}")
                if request.get("cmd") == "exit":
                    self.wfile.write(b'{"ok": true}\n')
                    self.wfile.flush()
                    os._exit(0)
                reply = server.answer(request)
            except Exception as exc:  # reported to the client; the server keeps serving
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")

    socketserver.TCPServer.allow_reuse_address = True
    with socketserver.TCPServer((host, port), Handler) as tcp:
        print(json.dumps({"event": "ready", **server.ping()}), flush=True)
        tcp.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="directory: config.json + safetensors shards")
    parser.add_argument("--port", type=int, default=47611)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    args = parser.parse_args()
    serve(Server(args), args.host, args.port)


if __name__ == "__main__":
    main()
