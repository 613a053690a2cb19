"""CRIU's image files as the agent reads them: the framing and a minimal protobuf wire decoder.

    framing   u32 common magic, u32 image magic, then records of a u32 length and one protobuf message
              (CRIU's criu/include/magic.h and images/*.proto)
    messages  ``fields`` gives a message's fields by number (varints as ints, length-delimited as bytes),
              ``ints`` a repeated varint field packed or not, ``message`` one nested message

Only what the agent checks is decoded (``privilege.py``: credentials; ``memimages.py``: where the page
data lands in memory). Every decoder raises ``ValueError`` on malformed input; callers name the file.
"""

from __future__ import annotations

import struct

IMG_COMMON_MAGIC = 0x54564319
CORE_MAGIC = 0x55053847
PSTREE_MAGIC = 0x50273030
MM_MAGIC = 0x57492820
PAGEMAP_MAGIC = 0x56084025  # also the shared-memory pagemaps (pagemap-shmem-<id>.img)

Fields = dict[int, list[int | bytes]]


def varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(message: bytes) -> Fields:
    """The fields of one protobuf message: number -> values (varints as ints, length-delimited as bytes;
    packed repeated varints are left as bytes, see ``ints``)."""
    out: Fields = {}
    pos = 0
    while pos < len(message):
        key, pos = varint(message, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = varint(message, pos)
        elif wire == 1:
            value, pos = int.from_bytes(message[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(message[pos : pos + 4], "little"), pos + 4
        elif wire == 2:
            length, pos = varint(message, pos)
            value, pos = message[pos : pos + length], pos + length
        else:
            raise ValueError(f"unsupported wire type {wire} for field {number}")
        if pos > len(message):
            raise ValueError(f"field {number} runs past the end of the message")
        out.setdefault(number, []).append(value)
    return out


def ints(values: list[int | bytes]) -> list[int]:
    """A repeated varint field, packed or not."""
    result: list[int] = []
    for value in values:
        if isinstance(value, int):
            result.append(value)
            continue
        pos = 0
        while pos < len(value):
            number, pos = varint(value, pos)
            result.append(number)
    return result


def records(image: bytes, magic: int, kind: str) -> list[bytes]:
    """The messages of a CRIU image with the given magic: u32 common magic, u32 image magic, then
    (u32 length, message) records. ``kind`` names the image in the error."""
    if len(image) < 8:
        raise ValueError("shorter than CRIU's image header")
    common, found = struct.unpack_from("<II", image)
    if common != IMG_COMMON_MAGIC or found != magic:
        raise ValueError(f"magic {common:#x} {found:#x} is not a CRIU {kind} image")
    out, pos = [], 8
    while pos < len(image):
        if pos + 4 > len(image):
            raise ValueError("truncated record length")
        (length,) = struct.unpack_from("<I", image, pos)
        pos += 4
        if pos + length > len(image):
            raise ValueError("record runs past the end of the image")
        out.append(image[pos : pos + length])
        pos += length
    return out


def message(found: Fields, number: int) -> Fields | None:
    """The last value of a nested-message field, decoded; None if absent."""
    values = found.get(number)
    if not values:
        return None
    if not isinstance(values[-1], bytes):
        raise ValueError(f"field {number} is not a message")
    return fields(values[-1])


def one(found: Fields, number: int, default: int = 0) -> int:
    """The last value of a varint field (``default`` if absent)."""
    values = ints(found.get(number, []))
    return values[-1] if values else default
