"""Byte-exact Go `encoding/json.Marshal` output for plain Python values.

Every hash in SPEC section 3 is SHA-256 over what Go's json.Marshal would print, so the bytes must match:
no whitespace; `<`, `>`, `&`, U+2028 and U+2029 escaped as `\\u003c`...; other non-ASCII left as raw UTF-8;
`/` not escaped; map keys sorted bytewise; floats in Go's shortest form. Ordered structs are passed as
`GoStruct` (a list of key/value pairs in field order) so that field order is explicit, never a dict accident.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

__all__ = ["GoStruct", "marshal"]


class GoStruct(tuple):
    """Ordered (name, value) pairs: a Go struct whose fields marshal in declaration order."""

    def __new__(cls, *fields: tuple[str, Any]) -> GoStruct:
        return super().__new__(cls, fields)


# Go escapes these in strings (HTML-safe mode, the json.Marshal default).
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_UNICODE_ESCAPED = {"<", ">", "&", "\u2028", "\u2029"}


def _escape_char(ch: str) -> str:
    short = _SHORT_ESCAPES.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x20 or ch in _UNICODE_ESCAPED:
        return f"\\u{code:04x}"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate is invalid UTF-8; Go writes U+FFFD
        return "\ufffd"
    return ch


_ESCAPE_TABLE = {i: _escape_char(chr(i)) for i in range(0x80)}
_ESCAPE_TABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def _string(value: str) -> str:
    escaped = value.translate(_ESCAPE_TABLE)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in escaped):
        escaped = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in escaped)
    return '"' + escaped + '"'


def _float(value: float) -> str:
    # Go: the shortest round-trip digits (as Python's repr), printed positionally ('f') unless the
    # exponent is < -6 or >= 21, then as 'e' with "e-07" cleaned to "e-7" (but "e+21" kept).
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"json: unsupported value: {value!r}")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    shortest = Decimal(repr(value)).normalize()
    if 1e-6 <= abs(value) < 1e21:
        return format(shortest, "f")
    sign, digits, exponent = shortest.as_tuple()
    sci_exponent = len(digits) - 1 + int(exponent)
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    exp_text = f"{abs(sci_exponent):02d}"
    if sci_exponent < 0 and exp_text.startswith("0"):
        exp_text = exp_text[1:]
    return ("-" if sign else "") + mantissa + "e" + ("-" if sci_exponent < 0 else "+") + exp_text


def _encode(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, GoStruct):
        out.append("{")
        for index, (name, field) in enumerate(value):
            if index:
                out.append(",")
            out.append(_string(name))
            out.append(":")
            _encode(field, out)
        out.append("}")
    elif isinstance(value, Mapping):
        out.append("{")
        keys = sorted(value, key=lambda k: _require_str_key(k).encode("utf-8", "surrogatepass"))
        for index, key in enumerate(keys):
            if index:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"json: unsupported type: {type(value).__name__}")


def _require_str_key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"json: map keys must be strings, got {type(key).__name__}")
    return key


def marshal(value: Any) -> bytes:
    """What Go's json.Marshal prints for `value`, as UTF-8 bytes."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out).encode("utf-8")
