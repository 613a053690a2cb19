"""CRIU image files written by hand for tests: the framing and the few protobuf messages the agent
decodes (``container/criuimage.py``, ``memimages.py``)."""

from __future__ import annotations

import struct

from dynamo_snapshot.agent.container.criuimage import (
    CORE_MAGIC,
    IMG_COMMON_MAGIC,
    MM_MAGIC,
    PAGEMAP_MAGIC,
    PSTREE_MAGIC,
)


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def msg(*fields: tuple[int, int | bytes]) -> bytes:
    """A protobuf message: (number, int) as a varint, (number, bytes) length-delimited."""
    out = b""
    for number, value in fields:
        if isinstance(value, bytes):
            out += varint(number << 3 | 2) + varint(len(value)) + value
        else:
            out += varint(number << 3) + varint(value)
    return out


def image(magic: int, *records: bytes) -> bytes:
    return struct.pack("<II", IMG_COMMON_MAGIC, magic) + b"".join(struct.pack("<I", len(r)) + r for r in records)


def pstree(*processes: tuple[int, list[int]]) -> bytes:
    return image(PSTREE_MAGIC, *(msg((1, pid), (2, 0), (3, pid), (4, pid), *((5, t) for t in threads))
                                 for pid, threads in processes))


def pagemap(pages_id: int, *entries: tuple[int, int, int]) -> bytes:
    """Entries of (vaddr, pages, flags)."""
    return image(PAGEMAP_MAGIC, msg((1, pages_id)), *(msg((1, v), (2, n), (4, f)) for v, n, f in entries))


def mm(*vmas: tuple[int, int, int]) -> bytes:
    """VMAs of (start, end, status)."""
    return image(MM_MAGIC, msg((1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (7, 0), (8, 0), (9, 0), (10, 0),
                               (11, 0), (12, 0),
                               *((14, msg((1, s), (2, e), (3, 0), (4, 0), (5, 3), (6, 0x22), (7, st)))
                                 for s, e, st in vmas)))


def core(rseq: tuple[int, int] | None = None) -> bytes:
    thread = msg((1, 0), *(((15, msg((1, rseq[0]), (2, rseq[1]))),) if rseq else ()))
    return image(CORE_MAGIC, msg((1, 1), (5, thread)))
