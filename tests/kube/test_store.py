"""The store: keys, indexes, replace diffs and snapshots (no cluster needed)."""

from __future__ import annotations

import msgspec

from dynamo_snapshot.api import ObjectMeta
from dynamo_snapshot.kube import NAMESPACE_INDEX, Store, index_by_label, index_by_owner


def cm(ns: str, name: str, rv: str = "1", **labels: str) -> dict:
    return {"metadata": {"namespace": ns, "name": name, "resourceVersion": rv, "labels": labels}}


def test_keys_and_namespace_and_label_indexes():
    store: Store[dict] = Store(indexers={"app": index_by_label("app")})
    store.put(cm("a", "x", app="web"))
    store.put(cm("a", "y", app="db"))
    store.put(cm("b", "x", app="web"))
    store.put({"metadata": {"name": "node-1", "resourceVersion": "1"}})  # cluster-scoped
    assert store.get("a/x")["metadata"]["name"] == "x"
    assert store.get_by_name(None, "node-1") is not None
    assert sorted(store.index_keys(NAMESPACE_INDEX, "a")) == ["a/x", "a/y"]
    assert sorted(store.index_keys("app", "web")) == ["a/x", "b/x"]
    store.put(cm("a", "x", rv="2", app="db"))  # relabelled: moves between index values
    assert sorted(store.index_keys("app", "web")) == ["b/x"]
    assert sorted(store.index_keys("app", "db")) == ["a/x", "a/y"]
    store.remove("b/x")
    assert store.index_values("app") == ["db"]


def test_custom_index_added_later_files_existing_objects():
    store: Store[dict] = Store()
    store.put(cm("a", "x", tier="gold"))
    store.add_indexers({"tier": lambda o: [o["metadata"]["labels"].get("tier", "none")]})
    assert store.index_keys("tier", "gold") == ["a/x"]


def test_replace_reports_adds_real_updates_and_deletes():
    store: Store[dict] = Store()
    for name in "abc":
        store.put(cm("ns", name))
    added, updated, deleted = store.replace([cm("ns", "a"), cm("ns", "b", rv="2"), cm("ns", "d")], "9")
    assert [o["metadata"]["name"] for o in added] == ["d"]
    assert [(old["metadata"]["resourceVersion"], new["metadata"]["resourceVersion"]) for old, new in updated] \
        == [("1", "2")]  # 'a' did not change: not reported
    assert [o["metadata"]["name"] for o in deleted] == ["c"]
    assert sorted(store.keys()) == ["ns/a", "ns/b", "ns/d"]
    assert sorted(store.index_keys(NAMESPACE_INDEX, "ns")) == ["ns/a", "ns/b", "ns/d"]
    assert store.resource_version == "9"


def test_snapshot_stays_consistent_while_the_store_moves_on():
    store: Store[dict] = Store(indexers={"app": index_by_label("app")})
    store.put(cm("ns", "a", app="web"))
    snap = store.snapshot()
    assert store.snapshot() is snap  # unchanged store: the same snapshot, no copy
    store.put(cm("ns", "b", app="web"))
    store.remove("ns/a")
    assert snap.keys() == ["ns/a"]
    assert snap.index_keys("app", "web") == ["ns/a"]
    assert store.snapshot().keys() == ["ns/b"]


def test_structs_and_owner_index():
    class Obj(msgspec.Struct):
        metadata: ObjectMeta

    store: Store[Obj] = Store(indexers={"owner": index_by_owner})
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": "u"}
    store.put(msgspec.convert({"metadata": {"namespace": "ns", "name": "p", "ownerReferences": [owner]}}, Obj))
    assert store.index_keys("owner", "ns/Job/j") == ["ns/p"]
