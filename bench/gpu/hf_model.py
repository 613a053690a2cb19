"""A random Llama-3-8B-shaped model directory for the unmodified transformers worker (hf_worker.py).

Stages:

    config    transformers' LlamaConfig (hidden 4096, 32 layers, 32 heads, 8 KV heads, ffn 14336,
              vocab 128256, bf16; ``--layers`` and the other flags shrink it) -> config.json
    shapes    parameter names and shapes from the model instantiated on the meta device (no memory)
    shards    tensors generated one by one (on the GPU when there is one, seeded per tensor: linear
              weights N(0, 0.02), norms ones) and written straight into safetensors shards, each
              fsynced, plus model.safetensors.index.json when there are several
    marker    hf-model.json (what was written) last: a directory without it is incomplete
    bandwidth with ``--bandwidth`` and a GPU: pinned H2D and D2H (bench/gpu/weights.py)

Prints one JSON line: bytes, tensors, shards, seconds, ``generated`` (false: an identical complete
directory was there already), and the bandwidths. No network, no tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

MARKER = "hf-model.json"


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000 if args.vocab > 128000 else 1,
        eos_token_id=128001 if args.vocab > 128001 else 2,
    )
    try:  # transformers 5.x
        config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    except TypeError:
        config = LlamaConfig(**shape, rope_theta=500000.0)
    config.dtype = torch.bfloat16
    return config


def parameter_shapes(config: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every saved tensor, from a model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most ``shard_bytes`` (a larger tensor alone). Pure."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float32, device=device, generator=gen) * 0.02).to(torch.bfloat16)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, device: str) -> int:
    """One safetensors file: 8-byte header length, JSON header (space-padded to 8), the tensors'
    bytes back to back in header order. Returns the data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for i, (name, shape) in enumerate(tensors):
            t = random_tensor(name, shape, seed + i, device).cpu().contiguous()
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return offset


def generate(args: argparse.Namespace, wanted: dict[str, Any]) -> dict[str, Any]:
    config = llama_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MARKER).unlink(missing_ok=True)
    config.save_pretrained(args.out)
    shapes = parameter_shapes(config)
    shards = plan_shards(shapes, int(args.shard_gb * 1e9))
    names = shard_names(len(shards))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    total, weight_map, first = 0, {}, 0
    for name, tensors in zip(names, shards, strict=True):
        total += write_shard(args.out / name, tensors, args.seed + first, device)
        weight_map.update({t: name for t, _ in tensors})
        first += len(tensors)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (args.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    info = {**wanted, "bytes": total, "tensors": len(shapes), "shards": names, "generated_on": device,
            "write_s": round(time.perf_counter() - started, 2)}
    (args.out / MARKER).write_text(json.dumps(info))
    return info


def existing(out: Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a complete directory written with the same parameters, else None."""
    try:
        info = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    same = all(info.get(k) == v for k, v in wanted.items())
    return info if same and all((out / s).is_file() for s in info.get("shards", [])) else None


def bandwidth() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import weights

    return {
        "pinned_h2d_gbps": round(weights.pinned_copy_gbps(1 << 30, 5, to_device=True), 2),
        "pinned_d2h_gbps": round(weights.pinned_copy_gbps(1 << 30, 5, to_device=False), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the model directory")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB")
    parser.add_argument("--regenerate", action="store_true")
    parser.add_argument("--bandwidth", action="store_true", help="also measure pinned H2D and D2H (GPU)")
    args = parser.parse_args()
    wanted = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "seed")}
    wanted["shard_gb"] = args.shard_gb
    started = time.perf_counter()
    info = None if args.regenerate else existing(args.out, wanted)
    generated = info is None
    if info is None:
        info = generate(args, wanted)
    print(json.dumps({**info, "generated": generated, "total_s": round(time.perf_counter() - started, 2),
                      **(bandwidth() if args.bandwidth else {})}), flush=True)


if __name__ == "__main__":
    main()
