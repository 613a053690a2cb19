"""Decoding Kubernetes objects into the api structs, with errors that name the field."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

__all__ = ["InvalidObject", "Malformed", "Refused", "convert", "decode_json", "malformed_of", "to_dict"]


class InvalidObject(ValueError):
    """An object that does not fit its schema. `path` is the dotted field path (`spec.identity.model`)."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class Refused(msgspec.ValidationError):
    """An object that decodes but that a decoder refuses by name (`api.decode_dgd`: a feature this project
    does not run, a path in the shape the object was written in): an `InvalidObject` raised as the
    msgspec.ValidationError an informer hands its `on_mismatch`, which keeps `invalid` as it is."""

    def __init__(self, invalid: InvalidObject):
        super().__init__(str(invalid))
        self.invalid = invalid


_AT = re.compile(r"^(?P<problem>.*?)(?P<at>( - at `\$[^`]*`)+)$", re.S)
_AT_PART = re.compile(r" - at `\$([^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")


def _path_from(raw_path: str) -> str:
    # msgspec writes `$.spec.identity` and `$.spec.items[0]`; we write `spec.identity`, `spec.items[0]`.
    return raw_path.lstrip(".")


def _problem_from(text: str) -> str:
    # "Expected `int` >= 1, got `0`" -> "expected >= 1, got 0"
    text = text.replace("`", "")
    match = re.match(r"Expected (?P<type>\S+) (?P<rest>[<>=!]+ .*)$", text)
    if match:
        return "expected " + match["rest"]
    return text[:1].lower() + text[1:]


def _allowed_values(type_: Any, path: str) -> list[str] | None:
    """The values an enum/Literal field at `path` accepts, found by walking the struct types."""
    info = msgspec.inspect.type_info(type_)
    for part in re.findall(r"[^.\[\]]+|\[[^\]]*\]", path):
        while isinstance(info, msgspec.inspect.UnionType):
            info = next((t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)), info)
        if part.startswith("["):
            info = getattr(info, "item_type", None) or getattr(info, "value_type", None)
        elif isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == part), None)
        else:
            return None
        if info is None:
            return None
    while isinstance(info, msgspec.inspect.UnionType):
        info = next((t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)), info)
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(v) for v in info.values]
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(m.value) for m in info.cls]
    return None


def _translate(err: msgspec.ValidationError, type_: Any) -> InvalidObject:
    text = str(err)
    match = _AT.match(text)
    # a shape check inside a struct (api.podtemplate) adds its own inner path: innermost first
    parts = _AT_PART.findall(match["at"]) if match else []
    path = _path_from("".join(reversed(parts)))
    problem = match["problem"] if match else text
    missing = _MISSING.match(problem)
    if missing:
        field = missing["field"]
        return InvalidObject(f"{path}.{field}" if path else field, "required field is missing")
    problem = _problem_from(problem)
    if problem.startswith("invalid enum value"):
        allowed = _allowed_values(type_, path)
        if allowed:
            problem += f" (expected one of: {', '.join(allowed)})"
    return InvalidObject(path, problem)


_JSON_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "null": type(None), "array": list,
               "object": dict}


def _fits(value: Any, got: str) -> bool:
    kind = _JSON_TYPES.get(got)
    return kind is not None and type(value) is kind


def _name_keys(invalid: InvalidObject, obj: Any) -> InvalidObject:
    """msgspec writes a mapping's key as `[...]`: name it from the object (the first key whose value at
    the rest of the path has the type msgspec got), so the message says `services[Worker]`."""
    if "[...]" not in invalid.path:
        return invalid
    got = re.search(r"got (\w+)$", invalid.problem)
    parts = re.findall(r"[^.\[\]]+|\[[^\]]*\]", invalid.path)

    def walk(node: Any, i: int) -> str | None:
        if i == len(parts):
            return "" if got is None or _fits(node, got[1]) else None
        part = parts[i]
        if part == "[...]" and isinstance(node, dict):
            for key, value in node.items():
                rest = walk(value, i + 1)
                if rest is not None:
                    return f"[{key}]{rest}"
            return None
        if part.startswith("[") and isinstance(node, list) and part[1:-1].isdigit() and int(part[1:-1]) < len(node):
            rest = walk(node[int(part[1:-1])], i + 1)
            return None if rest is None else f"{part}{rest}"
        if not part.startswith("[") and isinstance(node, dict) and part in node:
            rest = walk(node[part], i + 1)
            return None if rest is None else f".{part}{rest}"
        return None

    named = walk(obj, 0)
    return InvalidObject(named.lstrip("."), invalid.problem) if named else invalid


def convert(obj: Any, type_: type[T]) -> T:
    """Convert a plain dict (as read from the API server) into `type_`, raising InvalidObject."""
    try:
        return msgspec.convert(obj, type_)
    except msgspec.ValidationError as err:
        raise _name_keys(_translate(err, type_), obj) from None


def decode_json(data: bytes | str, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as err:
        raise _translate(err, type_) from None


def to_dict(obj: Any) -> Any:
    """The CRD-shaped plain value of an api struct (camelCase keys, defaults omitted)."""
    return msgspec.to_builtins(obj)


class _Envelope(msgspec.Struct):
    metadata: dict[str, Any] = {}
    status: Any = None


class Malformed(msgspec.Struct, kw_only=True):
    """The cache's stand-in for an object the API server holds that does not fit its api struct: its
    metadata and stored status, and what is wrong (`path`, `problem`), so a controller can mark it failed
    by name once instead of failing on it at every retry."""

    metadata: Any  # api.meta.ObjectMeta
    status: Any  # the type's status struct: the stored one, or its default where that does not fit either
    path: str
    problem: str
    kind: str = ""
    api_version: str = ""

    @property
    def message(self) -> str:
        return f"invalid {self.kind or 'object'}: {self.path}: {self.problem}" if self.path else \
            f"invalid {self.kind or 'object'}: {self.problem}"


def _status_of(type_: Any, stored: Any) -> Any:
    """The stored status as `type_`'s status struct; its default if it does not fit (nor does the object)."""
    field = next((f for f in msgspec.structs.fields(type_) if f.name == "status"), None)
    if field is None:
        return stored if isinstance(stored, dict) else {}
    fresh = field.default_factory if field.default_factory is not msgspec.NODEFAULT else field.type
    if isinstance(stored, dict):
        try:
            return msgspec.convert(stored, field.type)
        except msgspec.ValidationError:
            pass
    return fresh()


def malformed_of(type_: Any) -> Any:
    """An informer's `on_mismatch` for `type_`: the raw JSON and msgspec's error become a `Malformed`."""
    from dynamo_snapshot.api.meta import ObjectMeta

    def stand_in(raw: bytes, err: msgspec.ValidationError) -> Malformed | None:
        """`err` a `Refused`: its `invalid` as it is; otherwise msgspec's error, the keys named."""
        try:
            envelope = msgspec.json.decode(raw, type=_Envelope)
            meta = msgspec.convert(envelope.metadata, ObjectMeta)
        except msgspec.ValidationError:
            return None  # not even an object with metadata: nothing a controller could write to
        invalid = err.invalid if isinstance(err, Refused) else _name_keys(_translate(err, type_),
                                                                          msgspec.json.decode(raw))
        defaults = {f.name: f.default for f in msgspec.structs.fields(type_)}
        return Malformed(metadata=meta, status=_status_of(type_, envelope.status), path=invalid.path,
                         problem=invalid.problem, kind=defaults.get("kind", ""),
                         api_version=defaults.get("api_version", ""))

    stand_in.__name__ = f"malformed_of({getattr(type_, '__name__', type_)})"
    return _MALFORMED.setdefault(type_, stand_in)


_MALFORMED: dict[Any, Any] = {}
