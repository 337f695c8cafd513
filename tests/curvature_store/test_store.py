"""The store in one process: curvature artifacts, versions, rollback, cumulative deltas, checks."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from store_workers import child_env

import curvature_store.store as store_module
from curvature_store import Conflict, Corrupt, NotFound, Store, StoreError, sha256_file

MODEL, STREAM = "tiny", "main"
KEY_FIELDS = {
    "model_fingerprint": "fp-base",
    "layers": ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"],
    "corpus_digest": "c0ffee",
    "tokens": 4096,
    "labels": "self",
    "kind": "kfac",
    "format_version": 1,
}


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "store")


def raises(store: Store, exc: type[Exception], fn, *args, **kwargs) -> Exception:
    """Call `fn`, expect `exc`, and check the message never shows the store's absolute path."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(store.root) not in message and str(store.root.parent) not in message, message
    return info.value


def tensor_file(folder: Path, tensors: dict[str, np.ndarray], name: str = "x.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / name)
    return folder / name


def staged(store: Store, tensors: dict[str, np.ndarray], state: bool = False) -> dict[str, Path]:
    """Delta (and state) files written into a fresh staging folder, as the engine does."""
    folder = store.staging_dir()
    files = {"delta.safetensors": tensor_file(folder, tensors, "delta.safetensors")}
    if state:
        files["state.safetensors"] = tensor_file(
            folder, {"factor": np.ones(3, np.float32)}, "state.safetensors"
        )
    return files


def new_version(store: Store, seed: int, stream: str = STREAM, **manifest) -> dict:
    """A version on the stream's head with a random 4x3 delta of one layer."""
    rng = np.random.default_rng(seed)
    tensors = {"a.weight": rng.standard_normal((4, 3), dtype=np.float32)}
    parent = store.head(MODEL, stream)
    return store.create_version(MODEL, stream, parent, staged(store, tensors), manifest)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Corrupt a file in place without changing its size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def tree(path: Path) -> set[str]:
    return {str(p) for p in path.rglob("*")}


# --- the package -----------------------------------------------------------------------------


def test_import_does_not_load_torch(tmp_path):
    code = (
        "import sys, curvature_store\n"
        "assert curvature_store.Store is not None\n"
        "assert 'torch' not in sys.modules, 'curvature_store imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=child_env())


def test_open_existing_only(tmp_path):
    raises(Store(tmp_path / "s"), NotFound, Store, tmp_path / "missing", create=False)
    Store(tmp_path / "s")
    assert Store(tmp_path / "s", create=False).streams() == []


# --- curvature -------------------------------------------------------------------------------


def test_curvature_key_is_canonical_and_sensitive_to_every_field():
    key = Store.curvature_key(**KEY_FIELDS)
    assert len(key) == 32 and int(key, 16) >= 0
    assert Store.curvature_key(**dict(reversed(list(KEY_FIELDS.items())))) == key
    for field, other in [
        ("model_fingerprint", "fp-other"),
        ("layers", ["model.layers.1.mlp.down_proj"]),
        ("corpus_digest", "beef"),
        ("tokens", 4097),
        ("labels", "gold"),
        ("kind", "ekfac"),
        ("format_version", 2),
    ]:
        assert Store.curvature_key(**{**KEY_FIELDS, field: other}) != key, field
    with pytest.raises(StoreError, match="tokens"):
        Store.curvature_key(**{**KEY_FIELDS, "tokens": "4096"})


def test_put_find_cache_hit_list_verify_remove(store, tmp_path):
    first = tensor_file(tmp_path / "build1", {"A": np.eye(3, dtype=np.float32)})
    doc = store.put_curvature(first, KEY_FIELDS, meta={"seconds": 1.5})
    key = Store.curvature_key(**KEY_FIELDS)
    assert doc["key"] == key and doc["cache_hit"] is False
    assert doc["key_fields"] == KEY_FIELDS and doc["meta"] == {"seconds": 1.5}
    assert not first.exists()  # the store took the file
    path = store.curvature_file(key)
    assert path == store.root / "curvature" / key / "curvature.safetensors"
    assert doc["sha256"] == sha256_file(path) and doc["bytes"] == path.stat().st_size
    assert np.array_equal(load_file(path)["A"], np.eye(3, dtype=np.float32))

    found = store.find_curvature(**KEY_FIELDS)
    assert found is not None and found["sha256"] == doc["sha256"]
    assert store.find_curvature(**{**KEY_FIELDS, "tokens": 1}) is None

    # A second build of the same key: the stored artifact wins, the new file is dropped.
    second = tensor_file(tmp_path / "build2", {"A": np.zeros(3, dtype=np.float32)})
    hit = store.put_curvature(second, KEY_FIELDS)
    assert hit["cache_hit"] is True and hit["sha256"] == doc["sha256"] and not second.exists()
    assert store.curvature_file(key).read_bytes() == path.read_bytes()

    other_fields = {**KEY_FIELDS, "kind": "ekfac"}
    other = store.put_curvature(
        tensor_file(tmp_path / "b3", {"E": np.ones(2, np.float32)}), other_fields
    )
    assert sorted(d["key"] for d in store.list_curvature()) == sorted([key, other["key"]])
    store.verify_curvature(key)
    assert store.verify() == []

    store.remove_curvature(key)
    assert store.find_curvature(**KEY_FIELDS) is None
    raises(store, NotFound, store.curvature_file, key)
    raises(store, NotFound, store.remove_curvature, key)
    assert [d["key"] for d in store.list_curvature()] == [other["key"]]
    assert list((store.root / "tmp").iterdir()) == []


def test_put_curvature_from_staging_removes_the_staging_folder(store):
    folder = store.staging_dir()
    store.put_curvature(tensor_file(folder, {"A": np.eye(2, dtype=np.float32)}), KEY_FIELDS)
    assert not folder.exists()


def test_put_curvature_refuses_bad_key_fields_and_keeps_the_file(store, tmp_path):
    file = tensor_file(tmp_path / "b", {"A": np.eye(2, dtype=np.float32)})
    raises(store, StoreError, store.put_curvature, file, {**KEY_FIELDS, "extra": 1})
    fields = dict(KEY_FIELDS)
    del fields["kind"]
    raises(store, StoreError, store.put_curvature, file, fields)
    raises(store, StoreError, store.put_curvature, file, KEY_FIELDS, meta={"x": float("nan")})
    assert file.exists() and store.list_curvature() == []


def test_corrupt_curvature_is_refused_reported_and_replaced_by_a_rebuild(store, tmp_path):
    file = tensor_file(tmp_path / "b", {"A": np.arange(100, dtype=np.float32)})
    key = store.put_curvature(file, KEY_FIELDS)["key"]
    flip_byte(store.root / "curvature" / key / "curvature.safetensors")

    reader = Store(store.root)  # another process, e.g. the API
    err = raises(reader, Corrupt, reader.curvature_file, key)
    assert key in str(err)
    raises(reader, Corrupt, reader.verify_curvature, key)
    problems = reader.verify()
    assert len(problems) == 1 and key in problems[0]
    assert str(store.root) not in problems[0]

    rebuilt = tensor_file(tmp_path / "b2", {"A": np.arange(100, dtype=np.float32)})
    doc = reader.put_curvature(rebuilt, KEY_FIELDS)
    assert doc["cache_hit"] is False
    assert reader.verify() == []
    reader.curvature_file(key)
    assert list((store.root / "tmp").iterdir()) == []


def test_hash_is_cached_per_file_identity(store, tmp_path, monkeypatch):
    key = store.put_curvature(
        tensor_file(tmp_path / "b", {"A": np.ones(9, np.float32)}), KEY_FIELDS
    )["key"]
    reader = Store(store.root)
    calls = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: calls.append(p) or real(p))
    path = reader.curvature_file(key)
    reader.curvature_file(key)
    assert len(calls) == 1  # the second read trusts the remembered hash
    flip_byte(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    raises(reader, Corrupt, reader.curvature_file, key)
    assert reader.curvature_file(key, verify=False) == path


# --- versions --------------------------------------------------------------------------------


def test_create_version_chain_and_manifest(store):
    assert store.head(MODEL, STREAM) is None and store.lineage(MODEL, STREAM) == []
    files = staged(store, {"a.weight": np.ones((2, 2), np.float32)}, state=True)
    folder = files["delta.safetensors"].parent
    v1 = store.create_version(
        MODEL, STREAM, None, files, {"facts": [{"subject": "x"}], "method": "crisp"}
    )
    assert not folder.exists()  # staged files moved in, staging folder gone
    assert v1["id"].startswith("v") and len(v1["id"]) == 27
    assert (v1["model"], v1["stream"], v1["parent"], v1["number"]) == (MODEL, STREAM, None, 1)
    assert v1["facts"] == [{"subject": "x"}] and v1["method"] == "crisp"
    assert set(v1["files"]) == {"delta.safetensors", "state.safetensors"}
    for name, record in v1["files"].items():
        path = store.version_file(v1["id"], name)
        assert path.parent == store.root / "versions" / v1["id"]
        assert record == {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    assert store.manifest(v1["id"]) == v1
    assert json.loads((store.root / "versions" / v1["id"] / "manifest.json").read_text()) == v1

    v2 = new_version(store, 2)
    v3 = new_version(store, 3)
    assert (v2["parent"], v2["number"], v3["parent"], v3["number"]) == (v1["id"], 2, v2["id"], 3)
    assert v1["id"] < v2["id"] < v3["id"]  # ids are time-ordered
    info = store.head_info(MODEL, STREAM)
    assert (info["version"], info["count"], info["moves"]) == (v3["id"], 3, 3)
    assert [d["id"] for d in store.lineage(MODEL, STREAM)] == [v3["id"], v2["id"], v1["id"]]
    assert [d["id"] for d in store.lineage(MODEL, STREAM, upto=v2["id"])] == [v2["id"], v1["id"]]
    assert store.streams() == [(MODEL, STREAM)] and store.has_stream(MODEL, STREAM)
    raises(store, NotFound, store.version_file, v2["id"], "state.safetensors")
    log = [
        json.loads(line) for line in (store.root / "streams" / MODEL / STREAM / "log.jsonl").open()
    ]
    assert [(e["op"], e["version"], e["from"]) for e in log] == [
        ("create", v1["id"], None),
        ("create", v2["id"], v1["id"]),
        ("create", v3["id"], v2["id"]),
    ]
    assert store.verify() == [] and store.garbage() == []


def test_create_version_refuses_bad_arguments_without_touching_the_files(store):
    files = staged(store, {"a.weight": np.ones(2, np.float32)})
    raises(store, StoreError, store.create_version, MODEL, STREAM, None, files, {"number": 5})
    raises(store, StoreError, store.create_version, MODEL, STREAM, None, {}, {})
    raises(store, StoreError, store.create_version, MODEL, STREAM, None, files, {"m": float("inf")})
    bad_name = {**files, "../x.safetensors": files["delta.safetensors"]}
    raises(store, StoreError, store.create_version, MODEL, STREAM, None, bad_name, {})
    missing = {"delta.safetensors": store.root / "tmp" / "nope.safetensors"}
    raises(store, StoreError, store.create_version, MODEL, STREAM, None, missing, {})
    assert files["delta.safetensors"].exists()
    assert list((store.root / "versions").iterdir()) == [] and store.streams() == []


def test_conflict_on_wrong_parent_leaves_the_store_unchanged(store):
    v1 = new_version(store, 1)
    v2 = new_version(store, 2)
    log = store.root / "streams" / MODEL / STREAM / "log.jsonl"
    before = (
        sorted(os.listdir(store.root / "versions")),
        log.read_bytes(),
        store.head_info(MODEL, STREAM),
    )
    for parent in (v1["id"], None):
        files = staged(store, {"a.weight": np.ones((4, 3), np.float32)})
        err = raises(store, Conflict, store.create_version, MODEL, STREAM, parent, files, {})
        assert err.head == v2["id"]
        assert not files["delta.safetensors"].exists()  # staged files are removed
        after = (
            sorted(os.listdir(store.root / "versions")),
            log.read_bytes(),
            store.head_info(MODEL, STREAM),
        )
        assert after == before
    assert list((store.root / "tmp").iterdir()) == []
    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (RQ) with its head
    assert isinstance(again, Conflict) and again.head == v2["id"] and str(again) == str(err)


def test_conflict_found_under_the_lock_publishes_nothing(store, monkeypatch):
    """The head moves between the caller's early check and the locked one: still a Conflict."""
    v1, v2 = new_version(store, 1), new_version(store, 2)
    real = Store._read_head
    calls = []

    def stale_first(self, sdir):  # the unlocked early check still sees v1 as the head
        calls.append(sdir)
        return {**real(self, sdir), "version": v1["id"]} if len(calls) == 1 else real(self, sdir)

    monkeypatch.setattr(Store, "_read_head", stale_first)
    files = staged(store, {"a.weight": np.ones((4, 3), np.float32)})
    err = raises(store, Conflict, store.create_version, MODEL, STREAM, v1["id"], files, {})
    assert err.head == v2["id"] and len(calls) == 2
    assert sorted(os.listdir(store.root / "versions")) == sorted([v1["id"], v2["id"]])
    assert list((store.root / "tmp").iterdir()) == [] and not files["delta.safetensors"].exists()
    assert store.head(MODEL, STREAM) == v2["id"] and store.verify() == []


def test_threads_of_one_process_do_not_fork_the_head(store):
    from concurrent.futures import ThreadPoolExecutor

    parent = new_version(store, 0)["id"]

    def attempt(seed: int) -> str:
        files = staged(store, {"a.weight": np.full((4, 3), seed, np.float32)})
        try:
            return store.create_version(MODEL, STREAM, parent, files, {})["id"]
        except Conflict:
            return "conflict"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert sum(o != "conflict" for o in outcomes) == 1
    assert len(store.versions(MODEL, STREAM)) == 2 and store.verify() == []


def test_rollback_keeps_history(store):
    v1, v2, v3 = (new_version(store, i) for i in (1, 2, 3))
    info = store.rollback(MODEL, STREAM, v1["id"])
    assert (info["version"], info["count"]) == (v1["id"], 1)
    assert store.head(MODEL, STREAM) == v1["id"]
    assert [d["id"] for d in store.lineage(MODEL, STREAM)] == [v1["id"]]
    listed = store.versions(MODEL, STREAM)
    assert [(d["id"], d["in_lineage"]) for d in listed] == [
        (v3["id"], False),
        (v2["id"], False),
        (v1["id"], True),
    ]
    # Rolled-back versions are not ancestors any more: no rolling "forward" to them.
    raises(store, StoreError, store.rollback, MODEL, STREAM, v3["id"])
    v4 = new_version(store, 4)
    assert (v4["parent"], v4["number"]) == (v1["id"], 2)
    assert [(d["id"], d["in_lineage"]) for d in store.versions(MODEL, STREAM)] == [
        (v4["id"], True),
        (v3["id"], False),
        (v2["id"], False),
        (v1["id"], True),
    ]
    assert store.manifest(v3["id"])["parent"] == v2["id"]  # nothing deleted
    assert store.lineage(MODEL, STREAM, upto=v3["id"])[-1]["id"] == v1["id"]
    assert store.verify() == [] and store.garbage() == []
    log = (store.root / "streams" / MODEL / STREAM / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["op"] for line in log] == ["create"] * 3 + ["rollback", "create"]


def test_rollback_to_base_and_refusals(store):
    v1, v2 = new_version(store, 1), new_version(store, 2)
    other = new_version(store, 9, stream="other")
    raises(store, StoreError, store.rollback, MODEL, STREAM, other["id"])
    raises(store, StoreError, store.lineage, MODEL, STREAM, upto=other["id"])
    raises(store, NotFound, store.rollback, MODEL, STREAM, "v" + "0" * 26)
    raises(store, NotFound, store.rollback, MODEL, "never-written", None)
    err = raises(store, Conflict, store.rollback, MODEL, STREAM, v1["id"], expected_head=v1["id"])
    assert err.head == v2["id"]
    assert store.head(MODEL, STREAM) == v2["id"]
    assert store.rollback(MODEL, STREAM, v2["id"])["version"] == v2["id"]  # to the head: no move
    assert store.head_info(MODEL, STREAM)["moves"] == 2

    info = store.rollback(MODEL, STREAM, None, expected_head=v2["id"])
    assert (info["version"], info["count"], info["moves"]) == (None, 0, 3)
    assert store.head(MODEL, STREAM) is None and store.lineage(MODEL, STREAM) == []
    assert [d["in_lineage"] for d in store.versions(MODEL, STREAM)] == [False, False]
    assert store.streams() == [(MODEL, STREAM), (MODEL, "other")]
    v3 = new_version(store, 3)
    assert (v3["parent"], v3["number"]) == (None, 1)
    assert store.verify() == []


def test_cumulative_delta_is_the_chain_order_float32_sum(store, tmp_path):
    rng = np.random.default_rng(0)
    deltas = [
        {"a.weight": rng.standard_normal((5, 4), dtype=np.float32)},
        {
            "a.weight": rng.standard_normal((5, 4)).astype(np.float16),
            "b.weight": rng.random(3, np.float32),
        },
        {"a.weight": (rng.standard_normal((5, 4)) * 1e-7).astype(np.float32)},
        {"b.weight": rng.random(3, np.float32) * 1e6},
    ]
    ids = []
    for tensors in deltas:
        parent = store.head(MODEL, STREAM)
        manifest = {"base_fingerprint": f"fp{len(ids)}", "edited_fingerprint": f"fp{len(ids) + 1}"}
        ids.append(
            store.create_version(MODEL, STREAM, parent, staged(store, tensors), manifest)["id"]
        )

    for upto in range(1, len(deltas) + 1):
        expected: dict[str, np.ndarray] = {}
        for tensors in deltas[:upto]:
            for name, d in tensors.items():
                d = d.astype(np.float32)
                expected[name] = d.copy() if name not in expected else expected[name] + d
        got = store.cumulative_delta(ids[upto - 1])
        assert sorted(got) == sorted(expected)
        for name in expected:
            assert got[name].dtype == np.float32
            assert got[name].tobytes() == expected[name].tobytes()  # bitwise

    (tmp_path / "out").mkdir()
    out = store.write_cumulative_delta(ids[-1], tmp_path / "out")  # a folder: out/delta.safetensors
    assert out == tmp_path / "out" / "delta.safetensors"
    loaded = load_file(out)
    got = store.cumulative_delta(ids[-1])
    assert {k: v.tobytes() for k, v in loaded.items()} == {k: v.tobytes() for k, v in got.items()}
    with safe_open(out, framework="np") as f:
        meta = json.loads(f.metadata()["crispedit"])
    assert meta["version"] == ids[-1] and meta["against"] == "base" and meta["versions"] == 4
    assert meta["base_fingerprint"] == "fp0" and meta["edited_fingerprint"] == "fp4"


def test_cumulative_delta_falls_back_to_the_delta_files_header(store, tmp_path):
    folder = store.staging_dir()
    header = {"crispedit": json.dumps({"base_fingerprint": "fp-file", "format_version": 1})}
    save_file({"a.weight": np.ones(2, np.float32)}, folder / "delta.safetensors", metadata=header)
    v1 = store.create_version(
        MODEL, STREAM, None, {"delta.safetensors": folder / "delta.safetensors"}, {}
    )
    out = store.write_cumulative_delta(v1["id"], tmp_path / "c.safetensors")
    with safe_open(out, framework="np") as f:
        meta = json.loads(f.metadata()["crispedit"])
    assert meta["base_fingerprint"] == "fp-file" and "edited_fingerprint" not in meta


def test_corrupt_version_file_is_refused_and_reported(store):
    v1, v2 = new_version(store, 1), new_version(store, 2)
    flip_byte(store.root / "versions" / v1["id"] / "delta.safetensors")
    reader = Store(store.root)
    raises(reader, Corrupt, reader.version_file, v1["id"])
    raises(reader, Corrupt, reader.cumulative_delta, v2["id"])
    problems = reader.verify()
    assert len(problems) == 1 and v1["id"] in problems[0] and str(store.root) not in problems[0]
    reader.version_file(v2["id"])  # the other version is fine


def _flip_middle(path: Path) -> None:
    flip_byte(path, path.stat().st_size // 2)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_middle, _truncate], ids=["flip-middle", "truncate"])
def test_damaged_files_are_never_read_as_tensors(store, tmp_path, damage):
    """A delta or curvature file flipped in its tensor data (valid safetensors, wrong numbers) or
    cut short: every read refuses it with Corrupt naming the file, relative to the store."""
    v1 = new_version(store, 1)
    key = store.put_curvature(
        tensor_file(tmp_path / "c", {"A": np.arange(64, dtype=np.float32)}), KEY_FIELDS
    )["key"]
    delta = store.root / "versions" / v1["id"] / "delta.safetensors"
    curvature = store.root / "curvature" / key / "curvature.safetensors"
    for path in (delta, curvature):
        damage(path)
    reader = Store(store.root)
    for fn, args, name in (
        (reader.version_file, (v1["id"],), f"versions/{v1['id']}/delta.safetensors"),
        (reader.cumulative_delta, (v1["id"],), f"versions/{v1['id']}/delta.safetensors"),
        (reader.write_cumulative_delta, (v1["id"], tmp_path / "out.safetensors"), "delta"),
        (reader.curvature_file, (key,), f"curvature/{key}/curvature.safetensors"),
        (reader.verify_curvature, (key,), key),
    ):
        err = raises(reader, Corrupt, fn, *args)
        assert name in str(err), str(err)
    assert not (tmp_path / "out.safetensors").exists()
    problems = reader.verify()
    assert len(problems) == 2, problems
    assert any(v1["id"] in p for p in problems) and any(key in p for p in problems)
    # the same store object, after it verified the intact files once, notices the damage too
    fresh = Store(store.root)
    assert reader.version_file(v1["id"], verify=False) == delta  # unverified access still works
    raises(fresh, Corrupt, fresh.version_file, v1["id"])


def test_damage_after_a_verified_read_is_caught_by_the_same_store(store, tmp_path):
    """The remembered hash is keyed on the file's identity: rewriting the file in place (even to
    the same size) makes the next read hash it again."""
    v1 = new_version(store, 1)
    path = store.version_file(v1["id"])  # verified, hash remembered
    _flip_middle(path)
    raises(store, Corrupt, store.version_file, v1["id"])


def test_verify_reports_missing_versions_and_broken_links(store):
    _, v2, v3 = (new_version(store, i) for i in (1, 2, 3))
    os.rename(store.root / "versions" / v2["id"], store.root / "moved-away")
    problems = store.verify()
    assert any(v2["id"] in p and "stream" in p for p in problems), problems
    raises(store, Corrupt, store.lineage, MODEL, STREAM)
    raises(store, Corrupt, store.cumulative_delta, v3["id"])
    os.rename(store.root / "moved-away", store.root / "versions" / v2["id"])
    assert store.verify() == []
    (store.root / "versions" / v3["id"] / "delta.safetensors").unlink()
    assert any("missing" in p for p in store.verify())


def test_unparsable_manifest_and_head_are_corrupt(store):
    v1 = new_version(store, 1)
    (store.root / "versions" / v1["id"] / "manifest.json").write_text("{not json")
    raises(store, Corrupt, store.manifest, v1["id"])
    (store.root / "streams" / MODEL / STREAM / "HEAD.json").write_text('{"version": "../../x"}')
    raises(store, Corrupt, store.head, MODEL, STREAM)
    assert len(store.verify()) == 2


# --- names, ids and path traversal -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "..", ".hidden", "a..b", "", "x" * 129, "a b", 5, "nl\n", "a\nb"]
)
def test_bad_stream_and_model_names_are_refused(tmp_path, bad):
    store = Store(tmp_path / "store")
    files = staged(store, {"a.weight": np.ones(2, np.float32)})
    before = tree(tmp_path)
    for field, args in (("model", (bad, STREAM)), ("stream", (MODEL, bad))):
        for call in (store.head, store.lineage, store.versions, store.has_stream):
            err = raises(store, StoreError, call, *args)
            assert f"invalid {field} name" in str(err)
        raises(store, StoreError, store.create_version, *args, None, files, {})
        raises(store, StoreError, store.rollback, *args, None)
    assert tree(tmp_path) == before  # nothing created, inside the store or outside it


@pytest.mark.parametrize(
    "bad",
    ["../../x", "v" + "0" * 25, "v" + "0" * 25 + "/", "V" + "0" * 26, "v" + "0" * 26 + "\n", None],
)
def test_bad_version_ids_are_refused_before_touching_the_disk(store, tmp_path, bad):
    new_version(store, 1)
    before = tree(tmp_path)
    for call in (store.manifest, store.version_file, store.cumulative_delta):
        err = raises(store, StoreError, call, bad)
        assert not isinstance(err, NotFound | Corrupt)
    raises(store, StoreError, store.lineage, MODEL, STREAM, upto=bad or "x")
    raises(store, StoreError, store.write_cumulative_delta, bad, tmp_path / "out.safetensors")
    if bad is not None:
        raises(store, StoreError, store.rollback, MODEL, STREAM, bad)
        files = staged(store, {"a.weight": np.ones(2, np.float32)})
        before = tree(tmp_path)
        raises(store, StoreError, store.create_version, MODEL, STREAM, bad, files, {})
    assert tree(tmp_path) == before


def test_bad_file_names_and_curvature_keys_are_refused(store):
    v1 = new_version(store, 1)
    for name in ("../manifest.json", "manifest.json", "/etc/passwd", "a/b.safetensors",
                 "delta.safetensors\n"):  # fmt: skip
        raises(store, StoreError, store.version_file, v1["id"], name)
    for key in ("../x", "0" * 31, "G" * 32, "../../" + "0" * 26, "0" * 32 + "\n"):
        for call in (store.curvature_file, store.verify_curvature, store.remove_curvature):
            raises(store, StoreError, call, key)


# --- garbage ---------------------------------------------------------------------------------


def test_abandoned_staging_is_garbage_not_a_problem(store):
    new_version(store, 1)
    abandoned = staged(store, {"a.weight": np.ones(2, np.float32)})["delta.safetensors"].parent
    assert store.verify() == []
    assert store.garbage() == [abandoned]
    assert store.collect_garbage() == []  # too young: a writer may still be filling it
    assert store.collect_garbage(max_age_s=0) == [abandoned]
    assert not abandoned.exists() and store.garbage() == [] and store.verify() == []


def test_owner_and_actor_in_manifest_and_log(store):
    """A stream's owner is written once (the first claim wins, whoever claims later); the actor
    of a create or a rollback lands in the manifest and the log, and a caller cannot forge it."""
    assert store.stream_owner(MODEL, "owned") is None
    first = store.claim_stream(MODEL, "owned", {"team": "team-a", "by": {"key_id": "k1"}})
    again = store.claim_stream(MODEL, "owned", {"team": "team-b"})
    assert first == again == store.stream_owner(MODEL, "owned") and first["team"] == "team-a"
    assert first["claimed_at"] and not store.has_stream(MODEL, "owned")  # no version yet
    raises(store, StoreError, store.claim_stream, MODEL, "x", {"name": "no team"})
    actor = {"team": "team-a", "key_id": "abc"}
    files = staged(store, {"w": np.ones(2, dtype=np.float32)})
    doc = store.create_version(MODEL, "owned", None, files, {"facts": []}, actor=actor)
    assert store.manifest(doc["id"])["actor"] == actor
    store.rollback(MODEL, "owned", None, actor={"team": "team-a", "key_id": "def"})
    log = store.log(MODEL, "owned")
    assert [(e["op"], e["actor"]["key_id"]) for e in log] == [
        ("create", "abc"),
        ("rollback", "def"),
    ]
    forged = staged(store, {"w": np.ones(2, dtype=np.float32)})
    raises(store, StoreError, store.create_version, MODEL, "owned", None, forged, {"actor": actor})
    assert store.verify() == [] and store.streams() == [(MODEL, "owned")]
