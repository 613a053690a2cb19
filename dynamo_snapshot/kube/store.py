"""The informer's cache: objects by key, with secondary indexes, and consistent snapshots for readers.

Like client-go's `cache.Indexer`. Keys are `namespace/name` (`name` for cluster-scoped objects). An index
is a function from an object to the values it is filed under: `index_by_namespace`, `index_by_label("x")`,
or your own (`lambda pod: [pod["spec"].get("nodeName", "")]`).

Only the informer writes; readers get lists (copies taken at one instant) or a `snapshot()`, an immutable
view that stays consistent across awaits while the store moves on. Objects themselves are shared, never
copied: treat them as read-only, and copy before changing one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from dynamo_snapshot.kube.resources import labels_of, meta, owner_references, resource_version, store_key

__all__ = [
    "NAMESPACE_INDEX",
    "IndexFunc",
    "Store",
    "StoreSnapshot",
    "index_by_label",
    "index_by_namespace",
    "index_by_owner",
    "owner_key",
]

T = TypeVar("T")
IndexFunc = Callable[[Any], Iterable[str]]
NAMESPACE_INDEX = "namespace"


def index_by_namespace(obj: Any) -> list[str]:
    m = meta(obj)
    namespace = m.get("namespace") if isinstance(m, dict) else m.namespace
    return [namespace or ""]


def index_by_label(label: str) -> IndexFunc:
    """An index of objects by the value of one label (objects without it are not indexed)."""
    def index(obj: Any) -> list[str]:
        value = labels_of(obj).get(label)
        return [] if value is None else [value]
    index.__name__ = f"index_by_label({label!r})"
    return index


def owner_key(namespace: str, kind: str, name: str) -> str:
    """The value `index_by_owner` files an object under for one owner."""
    return f"{namespace}/{kind}/{name}"


def index_by_owner(obj: Any) -> list[str]:
    """An index by owner: `owner_key(namespace, owner kind, owner name)` for each ownerReference."""
    namespace = index_by_namespace(obj)[0]
    return [owner_key(namespace, ref["kind"], ref["name"]) for ref in owner_references(obj)]


class _Reader(Generic[T]):
    _items: Mapping[str, T]
    _indexers: Mapping[str, IndexFunc]

    def _index(self, name: str) -> Mapping[str, Any]:
        raise NotImplementedError

    def get(self, key: str) -> T | None:
        return self._items.get(key)

    def get_by_name(self, namespace: str | None, name: str) -> T | None:
        return self._items.get(f"{namespace}/{name}" if namespace else name)

    def list(self) -> list[T]:
        return list(self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def by_index(self, index: str, value: str) -> list[T]:
        """Every object filed under `value` in `index` (KeyError for an index that does not exist)."""
        keys = self._index(index).get(value, ())
        return [self._items[k] for k in keys]

    def index_keys(self, index: str, value: str) -> list[str]:
        return list(self._index(index).get(value, ()))

    @property
    def indexers(self) -> dict[str, IndexFunc]:
        return dict(self._indexers)

    def index_values(self, index: str) -> list[str]:
        """The values that have at least one object in `index`."""
        return list(self._index(index))


class StoreSnapshot(_Reader[T]):
    """The store as it was at one instant. Immutable; cheap to take again while the store has not changed."""

    def __init__(self, items: dict[str, T], indices: dict[str, dict[str, frozenset[str]]],
                 indexers: Mapping[str, IndexFunc], resource_version: str):
        self._items = items
        self._indices = indices
        self._indexers = indexers
        self.resource_version = resource_version

    def _index(self, name: str) -> Mapping[str, frozenset[str]]:
        if name not in self._indices:
            raise KeyError(f"no index {name!r}; indexes: {sorted(self._indices)}")
        return self._indices[name]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())


class Store(_Reader[T]):
    def __init__(self, *, key_func: Callable[[Any], str] = store_key,
                 indexers: Mapping[str, IndexFunc] | None = None):
        self.key_func = key_func
        self._items: dict[str, T] = {}
        self._indexers: dict[str, IndexFunc] = {}
        self._indices: dict[str, dict[str, set[str]]] = {}
        self._snapshot: StoreSnapshot[T] | None = None
        self.resource_version = ""  # of the last list or event applied
        self.add_indexers({NAMESPACE_INDEX: index_by_namespace, **(indexers or {})})

    def _index(self, name: str) -> Mapping[str, set[str]]:
        if name not in self._indices:
            raise KeyError(f"no index {name!r}; indexes: {sorted(self._indices)}")
        return self._indices[name]

    def add_indexers(self, indexers: Mapping[str, IndexFunc]) -> None:
        """Add indexes (at any time: existing objects are filed at once)."""
        for name, func in indexers.items():
            if inspect.iscoroutinefunction(func):
                raise TypeError(f"index {name!r}: index functions must be plain functions")
            if name in self._indexers and self._indexers[name] is not func:
                raise ValueError(f"index {name!r} already exists")
            self._indexers[name] = func
            index: dict[str, set[str]] = {}
            for key, obj in self._items.items():
                for value in func(obj):
                    index.setdefault(value, set()).add(key)
            self._indices[name] = index
        self._snapshot = None

    def snapshot(self) -> StoreSnapshot[T]:
        if self._snapshot is None:
            indices = {name: {v: frozenset(keys) for v, keys in index.items()} for name, index in self._indices.items()}
            self._snapshot = StoreSnapshot(dict(self._items), indices, dict(self._indexers), self.resource_version)
        return self._snapshot

    # -- writes (the informer's) -------------------------------------------------------------------------
    def _file(self, key: str, old: T | None, new: T | None) -> None:
        for name, func in self._indexers.items():
            index = self._indices[name]
            old_values = set(func(old)) if old is not None else set()
            new_values = set(func(new)) if new is not None else set()
            for value in old_values - new_values:
                keys = index.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[value]
            for value in new_values - old_values:
                index.setdefault(value, set()).add(key)

    def put(self, obj: T) -> T | None:
        """Add or replace an object; returns the one it replaced."""
        key = self.key_func(obj)
        old = self._items.get(key)
        self._items[key] = obj
        self._file(key, old, obj)
        self._snapshot = None
        return old

    def remove(self, key: str) -> T | None:
        """Remove by key; returns the object removed (None if there was none)."""
        old = self._items.pop(key, None)
        if old is not None:
            self._file(key, old, None)
            self._snapshot = None
        return old

    def replace(self, objects: Iterable[T], resource_version: str = "") -> tuple[list[T], list[tuple[T, T]], list[T]]:
        """Make the store exactly `objects`; returns (added, updated as (old, new), deleted).

        An object counts as updated only when its resourceVersion changed: a relist that finds everything as
        it was reports nothing. Deleted objects are the last state the store knew.
        """
        new_items = {self.key_func(obj): obj for obj in objects}
        added: list[T] = []
        updated: list[tuple[T, T]] = []
        for key, obj in new_items.items():
            old = self._items.get(key)
            if old is None:
                added.append(obj)
            elif resource_version_changed(old, obj):
                updated.append((old, obj))
        deleted = [obj for key, obj in self._items.items() if key not in new_items]
        self._items = new_items
        for name, func in self._indexers.items():
            index: dict[str, set[str]] = {}
            for key, obj in new_items.items():
                for value in func(obj):
                    index.setdefault(value, set()).add(key)
            self._indices[name] = index
        if resource_version:
            self.resource_version = resource_version
        self._snapshot = None
        return added, updated, deleted


def resource_version_changed(old: Any, new: Any) -> bool:
    return resource_version(old) != resource_version(new) or not resource_version(new)
