"""Weights for the GPU stand-in worker: a safetensors file, a releasable device buffer, a fast loader.

* ``write_safetensors``: random bf16 weights in the safetensors format (header, then the tensors
  back to back), generated on the GPU tensor by tensor so host memory stays small.
* ``DeviceBuffer``: the weights' device memory. ``torch`` mode is a plain allocation; ``vmm`` mode
  reserves a virtual address range once and maps physical memory into it (cuMemCreate/cuMemMap), so
  the memory can be **released before a checkpoint and mapped again after the restore at the same
  address**: tensors, CUDA graphs and compiled code that hold the weights' pointers stay valid, and
  the CUDA checkpoint (and the CRIU image) no longer carries weights that can be read again from the
  file.
* ``load``: file -> device at storage speed: readers in parallel into pinned buffers, each copied to
  the device on its own stream.

Needs torch and, for ``vmm``, cuda-bindings (both on the device machines, not in the project's deps).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALIGN = 4096  # data region and every tensor start on a page boundary (O_DIRECT-friendly, aligned views)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    begin: int  # byte offset in the data region
    end: int


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    data_offset: int  # where the data region starts in the file
    tensors: tuple[TensorEntry, ...]

    @property
    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors), default=0)


def model_shapes(total_gib: float, hidden: int, ffn: int) -> list[tuple[str, tuple[int, ...]]]:
    """SwiGLU MLP blocks (norm, gate, up, down) until ``total_gib`` of bf16 is reached."""
    per_block = (hidden + 3 * hidden * ffn) * 2
    blocks = max(1, round(total_gib * (1 << 30) / per_block))
    shapes = []
    for i in range(blocks):
        shapes += [
            (f"blocks.{i}.norm", (hidden,)),
            (f"blocks.{i}.gate", (ffn, hidden)),
            (f"blocks.{i}.up", (ffn, hidden)),
            (f"blocks.{i}.down", (hidden, ffn)),
        ]
    return shapes


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> WeightsFile:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "dynamo-snapshot bench"}}
    offset = 0
    entries = []
    for name, shape in shapes:
        nbytes = 2
        for dim in shape:
            nbytes *= dim
        begin = _round_up(offset, ALIGN)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        entries.append(TensorEntry(name, tuple(shape), begin, begin + nbytes))
        offset = begin + nbytes
    # safetensors requires contiguous data; alignment gaps are covered by 1-byte filler entries.
    filler, cursor = 0, 0
    for entry in entries:
        if entry.begin > cursor:
            gap = [cursor, entry.begin]
            header[f"_pad.{filler}"] = {"dtype": "U8", "shape": [entry.begin - cursor], "data_offsets": gap}
            filler += 1
        cursor = entry.end
    text = json.dumps(header, separators=(",", ":")).encode()
    data_offset = _round_up(8 + len(text), ALIGN)
    text += b" " * (data_offset - 8 - len(text))  # padding the header with spaces is allowed
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        cursor = 0
        for entry in entries:
            if entry.begin > cursor:
                f.write(b"\0" * (entry.begin - cursor))
            t = torch.randn(entry.shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            f.write(t.view(torch.int16).cpu().numpy().tobytes())
            cursor = entry.end
            del t
        f.flush()
        os.fsync(f.fileno())
    return WeightsFile(path, data_offset, tuple(entries))


def read_header(path: Path) -> WeightsFile:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    entries = []
    for name, meta in header.items():
        if name == "__metadata__" or name.startswith("_pad."):
            continue
        if meta["dtype"] != "BF16":
            raise ValueError(f"{path}: {name} is {meta['dtype']}; the stand-in worker reads BF16")
        begin, end = meta["data_offsets"]
        entries.append(TensorEntry(name, tuple(meta["shape"]), begin, end))
    return WeightsFile(Path(path), 8 + n, tuple(sorted(entries, key=lambda e: e.begin)))


class _CudaArray:
    """A raw device range as __cuda_array_interface__, for a zero-copy torch view."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def _check(result: Any, what: str) -> Any:
    err = result[0]
    if getattr(err, "name", "CUDA_SUCCESS") != "CUDA_SUCCESS":
        raise RuntimeError(f"{what} failed: {err.name}")
    return result[1] if len(result) == 2 else result[1:]


class DeviceBuffer:
    """The weights' device memory, as one uint8 tensor (``.tensor``)."""

    def __init__(self, nbytes: int, mode: str = "vmm", device: int = 0):
        self.mode = mode
        self.device = device
        self.nbytes = nbytes
        self.mapped = False
        if mode == "torch":
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
            self.mapped = True
            return
        if mode != "vmm":
            raise ValueError(f"unknown device buffer mode {mode!r}")
        from cuda.bindings import driver as cu

        self._cu = cu
        torch.cuda.set_device(device)
        torch.zeros(1, device=f"cuda:{device}")  # the primary context exists and is current
        ctx = _check(cu.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        _check(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = device
        self._prop = prop
        gran = int(
            _check(
                cu.cuMemGetAllocationGranularity(
                    prop, cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
                ),
                "cuMemGetAllocationGranularity",
            )
        )
        self.gran = gran
        self.reserved_again = 0
        self.size = _round_up(nbytes, gran)
        self.ptr = int(_check(cu.cuMemAddressReserve(self.size, gran, 0, 0), "cuMemAddressReserve"))
        self._handle = None
        self.map()
        self.tensor = torch.as_tensor(_CudaArray(self.ptr, nbytes), device=f"cuda:{device}")

    def map(self) -> None:
        """Back the reserved range with physical memory (contents undefined until loaded)."""
        if self.mapped:
            return
        cu = self._cu
        self._handle = _check(cu.cuMemCreate(self.size, self._prop, 0), "cuMemCreate")
        (err,) = cu.cuMemMap(self.ptr, self.size, 0, self._handle, 0)
        if err.name != "CUDA_SUCCESS":
            # The address reservation did not survive (a driver that restores only mapped memory):
            # reserve exactly the old range again; anything else would break every pointer to it.
            got = int(_check(cu.cuMemAddressReserve(self.size, self.gran, self.ptr, 0), "cuMemAddressReserve"))
            if got != self.ptr:
                cu.cuMemAddressFree(got, self.size)
                raise RuntimeError(f"cuMemMap failed ({err.name}); the range at {self.ptr:#x} is taken")
            self.reserved_again += 1
            _check(cu.cuMemMap(self.ptr, self.size, 0, self._handle, 0), "cuMemMap")
        desc = cu.CUmemAccessDesc()
        desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        desc.location.id = self.device
        desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        _check(cu.cuMemSetAccess(self.ptr, self.size, [desc], 1), "cuMemSetAccess")
        self.mapped = True

    def release(self) -> None:
        """Give the physical memory back, keeping the address range: nothing may touch the weights
        until ``map()`` and a reload."""
        if self.mode != "vmm" or not self.mapped:
            return
        torch.cuda.synchronize(self.device)
        _check(self._cu.cuMemUnmap(self.ptr, self.size), "cuMemUnmap")
        _check(self._cu.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None
        self.mapped = False

    def views(self, weights: WeightsFile) -> dict[str, torch.Tensor]:
        return {t.name: self.tensor[t.begin : t.end].view(torch.bfloat16).view(t.shape) for t in weights.tensors}


@dataclass(frozen=True)
class LoadStats:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def load(weights: WeightsFile, dest: torch.Tensor, threads: int = 8, chunk: int = 64 << 20) -> LoadStats:
    """Copy the file's data region into ``dest`` (uint8, on the device): ``threads`` readers fill
    their own pinned buffer and copy it to the device on their own stream."""
    total = weights.data_bytes
    if dest.numel() < total:
        raise ValueError(f"device buffer of {dest.numel()} bytes cannot hold {total} bytes of weights")
    started = time.perf_counter()
    chunks = (total + chunk - 1) // chunk
    counter = iter(range(chunks))
    lock = threading.Lock()
    errors: list[BaseException] = []
    fd = os.open(weights.path, os.O_RDONLY)
    device = dest.device

    def worker() -> None:
        try:
            torch.cuda.set_device(device)
            pinned = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
            view = memoryview(pinned.numpy())
            stream = torch.cuda.Stream(device=device)
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                start = i * chunk
                n = min(chunk, total - start)
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:n]], weights.data_offset + start + done)
                    if got <= 0:
                        raise OSError(f"{weights.path}: short read at {start + done}")
                    done += got
                with torch.cuda.stream(stream):
                    dest[start : start + n].copy_(pinned[:n], non_blocking=True)
                stream.synchronize()  # the pinned buffer is reused for the next chunk
            del pinned
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, name=f"load-{i}") for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)
    if errors:
        raise errors[0]
    empty_host_cache()
    return LoadStats(total, time.perf_counter() - started)


def empty_host_cache() -> None:
    """Return cached pinned host memory to the system (torch keeps freed pinned blocks)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def pinned_h2d_gbps(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Host-to-device bandwidth from pinned memory, measured with CUDA events (median)."""
    return pinned_copy_gbps(nbytes, repeats, to_device=True)


def pinned_copy_gbps(nbytes: int = 1 << 30, repeats: int = 5, to_device: bool = True) -> float:
    """Bandwidth of one copy between pinned host memory and the device (``to_device``: H2D, else
    D2H), measured with CUDA events (median of ``repeats`` after one warm-up)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.random_(0, 255)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src, dst = (host, device) if to_device else (device, host)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times = sorted(times[1:])
    del src, dst, host, device
    empty_host_cache()
    torch.cuda.empty_cache()
    return nbytes / times[len(times) // 2] / 1e9


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="generate the stand-in worker's safetensors; measure pinned H2D")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--ffn", type=int, default=22016)
    args = parser.parse_args()
    started = time.perf_counter()
    info = write_safetensors(args.out, model_shapes(args.gib, args.hidden, args.ffn))
    written = time.perf_counter() - started
    check = {}
    try:  # the file must be one the safetensors library reads
        from safetensors import safe_open

        with safe_open(str(args.out), framework="pt") as f:
            first = info.tensors[1]
            check = {"safetensors_keys": len(list(f.keys())), "first_shape": list(f.get_tensor(first.name).shape)}
    except ImportError:
        check = {"safetensors": "not installed"}
    print(
        json.dumps(
            {
                "weights_bytes": info.data_bytes,
                "file_bytes": args.out.stat().st_size,
                "tensors": len(info.tensors),
                "write_s": round(written, 2),
                "pinned_h2d_gbps": round(pinned_h2d_gbps(), 2),
                **check,
            }
        )
    )


if __name__ == "__main__":
    main()
