"""Held versions (kept outside a guarded stream's policy, the head unmoved), publishing them, and
the stream's stored policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from curvature_store import Conflict, NotFound, Store, StoreError

MODEL, STREAM = "tiny", "main"


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def make(store: Store, value: float, publish: bool = True, parent=..., note=None) -> dict:
    stage = store.staging_dir()
    save_file({"w.weight": np.full((2, 2), value, np.float32)}, stage / "delta.safetensors")
    head = store.head(MODEL, STREAM) if parent is ... else parent
    files = {"delta.safetensors": stage / "delta.safetensors"}
    return store.create_version(
        MODEL, STREAM, head, files, {"value": value}, publish=publish, note=note
    )


def log(store: Store) -> list[dict]:
    path = store.root / "streams" / MODEL / STREAM / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_held_version_is_kept_listed_and_not_garbage_and_the_head_stays(store):
    first = make(store, 1.0)
    held = make(store, 2.0, publish=False, note={"failed": ["min_efficacy"]})
    assert store.head(MODEL, STREAM) == first["id"]
    assert held["parent"] == first["id"] and held["number"] == 2
    listed = {v["id"]: v for v in store.versions(MODEL, STREAM)}
    assert listed[held["id"]]["held"] and not listed[held["id"]]["in_lineage"]
    assert not listed[first["id"]]["held"]
    assert store.garbage() == [] and store.verify() == []
    assert log(store)[-1] == {
        **log(store)[-1], "op": "held", "version": held["id"], "failed": ["min_efficacy"]
    }  # fmt: skip
    # the cumulative delta of a held version is readable (to try it before publishing)
    assert store.cumulative_delta(held["id"])["w.weight"][0, 0] == 3.0


def test_the_first_version_of_a_new_stream_can_be_held(store):
    held = make(store, 1.0, publish=False)
    assert store.has_stream(MODEL, STREAM) and store.head(MODEL, STREAM) is None
    assert [v["held"] for v in store.versions(MODEL, STREAM)] == [True]
    info = store.publish_version(MODEL, STREAM, held["id"], note={"forced": True, "by": "admin"})
    assert info["version"] == held["id"] and info["count"] == 1
    entry = log(store)[-1]
    assert (entry["op"], entry["forced"], entry["by"]) == ("publish", True, "admin")
    assert [v["held"] for v in store.versions(MODEL, STREAM)] == [False]


def test_publish_refuses_a_stale_or_published_or_foreign_version_and_changes_nothing(store):
    first = make(store, 1.0)
    held = make(store, 2.0, publish=False)
    moved = make(store, 3.0)  # the stream moved on: the held version's parent is not the head
    before = store.head_info(MODEL, STREAM)
    with pytest.raises(Conflict) as err:
        store.publish_version(MODEL, STREAM, held["id"])
    assert err.value.head == moved["id"]
    with pytest.raises(StoreError, match="published already"):
        store.publish_version(MODEL, STREAM, first["id"])
    with pytest.raises(StoreError, match="not on stream"):
        store.publish_version(MODEL, "other", held["id"])
    with pytest.raises(NotFound):
        store.publish_version(MODEL, STREAM, "v" + "0" * 26)
    with pytest.raises(Conflict):
        store.publish_version(MODEL, STREAM, held["id"], expected_head=first["id"])
    assert store.head_info(MODEL, STREAM) == before


def test_a_held_version_published_then_rolled_back_is_not_held_again(store):
    first = make(store, 1.0)
    held = make(store, 2.0, publish=False)
    store.publish_version(MODEL, STREAM, held["id"], expected_head=first["id"])
    store.rollback(MODEL, STREAM, first["id"])
    listed = {v["id"]: v for v in store.versions(MODEL, STREAM)}
    assert not listed[held["id"]]["held"] and not listed[held["id"]]["in_lineage"]
    with pytest.raises(StoreError, match="published already"):
        store.publish_version(MODEL, STREAM, held["id"])


def test_a_policy_is_stored_with_its_stream_and_removed(store):
    assert store.policy(MODEL, STREAM) is None
    store.set_policy(MODEL, STREAM, {"min_efficacy": 0.9})
    assert store.policy(MODEL, STREAM) == {"min_efficacy": 0.9}
    assert not store.has_stream(MODEL, STREAM)  # a policy alone makes no version
    with pytest.raises(StoreError, match="plain JSON"):
        store.set_policy(MODEL, STREAM, {"x": float("nan")})
    assert store.policy(MODEL, STREAM) == {"min_efficacy": 0.9}
    assert store.delete_policy(MODEL, STREAM) and not store.delete_policy(MODEL, STREAM)
    assert store.policy(MODEL, STREAM) is None
    with pytest.raises(StoreError):
        store.set_policy(MODEL, "../x", {})
