"""Field checks shared by the sections of the agent's configuration file (``config.py``,
``storageconfig.py``): each error names the field (``<where>.<key>``), what was expected and what came."""

from __future__ import annotations

from typing import Any

from dynamo_snapshot.agent.errors import AgentError


class ConfigError(AgentError, ValueError):
    pass


def short(value: Any) -> str:
    """A value for a message: its repr, cut short (a fuzzed or binary value can be huge or deeply nested)."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def typed(section: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = section[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {short(value)}")
    return value


def section(data: Any, where: str, known: set[str]) -> dict[str, Any]:
    found = data or {}
    if not isinstance(found, dict):
        raise ConfigError(f"{where}: expected a mapping, got {short(found)}")
    if odd := [key for key in found if not isinstance(key, str)]:
        raise ConfigError(f"{where}: keys must be strings, got {short(odd[0])} (known: {', '.join(sorted(known))})")
    if unknown := sorted(set(found) - known):
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return found


def bounded(section: dict[str, Any], key: str, low: int, high: int, where: str, hint: str = "") -> int:
    value = typed(section, key, int, where)
    if not low <= value <= high:
        raise ConfigError(f"{where}.{key}: must be {low}-{high}{hint}, got {value}")
    return value
