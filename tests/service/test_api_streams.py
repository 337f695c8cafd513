"""Streams, versions and deltas against a real store: lists, manifests, downloads, rollback."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
from api_helpers import AUTH, AUTH_ADMIN, AUTH_TINY, edit_body, make_version
from fastapi.testclient import TestClient
from safetensors.numpy import load

from contract.jobs import curvature_index_key
from contract.names import DELTA_FILE
from service import deltas
from service.main import create_app


@pytest.fixture
def three(store) -> list[str]:
    """Three versions on tiny/main, oldest first; the third changes a layer's values only."""
    return [make_version(store, "tiny", "main", value)["id"] for value in (1.0, 0.5, -0.25)]


def test_versions_newest_first_with_head_and_lineage(client, store, three):
    response = client.get("/v1/streams/tiny/main/versions", headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["head"] == three[2]
    assert [v["id"] for v in body["versions"]] == three[::-1]
    assert [v["head"] for v in body["versions"]] == [True, False, False]
    assert all(v["in_lineage"] for v in body["versions"])
    newest = body["versions"][0]
    assert (newest["number"], newest["parent"], newest["n_facts"]) == (3, three[1], 1)
    assert newest["delta"] == store.manifest(three[2])["files"][DELTA_FILE]


def test_unknown_or_malformed_streams(client, three):
    assert client.get("/v1/streams/tiny/nope/versions", headers=AUTH).status_code == 404
    assert client.get("/v1/streams/gpt-9/main/versions", headers=AUTH).status_code == 404
    bad = client.get("/v1/streams/tiny/a..b/versions", headers=AUTH)
    assert bad.status_code == 400
    assert (bad.json()["error"]["code"], bad.json()["error"]["field"]) == ("invalid_name", "stream")
    encoded = client.get("/v1/streams/%2E%2E/main/versions", headers=AUTH)
    assert (encoded.status_code, encoded.json()["error"]["field"]) == (400, "model")


def test_a_trailing_newline_is_refused_in_every_name_and_id(client, store, three):
    # `$` matches before a final newline: each rule must match the whole value
    streams = client.get("/v1/streams/tiny/main%0A/versions", headers=AUTH)
    assert (streams.status_code, streams.json()["error"]["field"]) == (400, "stream")
    version = client.get(f"/v1/versions/{three[0]}%0A", headers=AUTH)
    assert (version.status_code, version.json()["error"]["field"]) == (400, "version_id")
    job = client.get("/v1/jobs/abc%0A", headers=AUTH)
    assert (job.status_code, job.json()["error"]["field"]) == (400, "job_id")
    edit = client.post("/v1/edits", headers=AUTH, json=edit_body(stream="nl\n"))
    assert edit.status_code == 422 and edit.json()["error"]["field"] == "stream"
    rollback = client.post(
        "/v1/streams/tiny/main/rollback", headers=AUTH_ADMIN, json={"version": three[0] + "\n"}
    )
    assert rollback.status_code == 422 and rollback.json()["error"]["field"] == "version"
    assert store.streams() == [("tiny", "main")]


def test_version_manifest(client, store, three):
    response = client.get(f"/v1/versions/{three[0]}", headers=AUTH)
    assert response.status_code == 200
    assert response.json() == store.manifest(three[0])
    missing = "v" + "0" * 26
    assert client.get(f"/v1/versions/{missing}", headers=AUTH).status_code == 404
    malformed = client.get("/v1/versions/v123", headers=AUTH)
    assert (malformed.status_code, malformed.json()["error"]["field"]) == (400, "version_id")


def test_versions_of_a_forbidden_model_are_404(client, store):
    version = make_version(store, "other", "main", 1.0)["id"]
    assert client.get(f"/v1/versions/{version}", headers=AUTH_TINY).status_code == 404
    assert client.get(f"/v1/versions/{version}/delta", headers=AUTH_TINY).status_code == 404
    assert client.get(f"/v1/versions/{version}", headers=AUTH).status_code == 200


def test_delta_download_with_etag_and_304(client, store, three):
    record = store.manifest(three[1])["files"][DELTA_FILE]
    response = client.get(f"/v1/versions/{three[1]}/delta", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["etag"] == f'"{record["sha256"]}"'
    assert int(response.headers["content-length"]) == record["bytes"] == len(response.content)
    assert hashlib.sha256(response.content).hexdigest() == record["sha256"]
    assert response.headers["content-type"] == "application/octet-stream"
    assert load(response.content)["layer.weight"][0, 0] == np.float32(0.5)

    for tag in (f'"{record["sha256"]}"', f'W/"{record["sha256"]}", "x"', "*"):
        cached = client.get(
            f"/v1/versions/{three[1]}/delta", headers={**AUTH, "If-None-Match": tag}
        )
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == response.headers["etag"]
    stale = client.get(f"/v1/versions/{three[1]}/delta", headers={**AUTH, "If-None-Match": '"x"'})
    assert stale.status_code == 200


def test_cumulative_delta_is_the_store_sum_bitwise(client, store, settings, three):
    url = f"/v1/versions/{three[2]}/delta?against=base"
    response = client.get(url, headers=AUTH)
    assert response.status_code == 200
    sha = hashlib.sha256(response.content).hexdigest()
    assert response.headers["etag"] == f'"{sha}"'
    assert int(response.headers["content-length"]) == len(response.content)

    expected = store.cumulative_delta(three[2])
    got = load(response.content)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype == np.float32
        assert got[name].tobytes() == tensor.tobytes()  # bitwise, not approximately

    again = client.get(url, headers=AUTH)  # from the cache this time
    assert again.content == response.content
    assert list(settings.cumulative_cache_dir.glob("*.safetensors"))
    cached = client.get(url, headers={**AUTH, "If-None-Match": f'"{sha}"'})
    assert cached.status_code == 304
    bad = client.get(f"/v1/versions/{three[2]}/delta?against=head", headers=AUTH)
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "against")


def test_rollback_moves_the_head_and_keeps_the_versions(client, store, three):
    url = "/v1/streams/tiny/main/rollback"
    stale = client.post(
        url, json={"version": three[0], "expected_head": three[1]}, headers=AUTH_ADMIN
    )
    assert stale.status_code == 409
    assert (stale.json()["error"]["code"], stale.json()["error"]["head"]) == (
        "stale_head",
        three[2],
    )

    moved = client.post(
        url, json={"version": three[0], "expected_head": three[2]}, headers=AUTH_ADMIN
    )
    assert moved.status_code == 200
    assert (moved.json()["head"], moved.json()["count"]) == (three[0], 1)
    assert store.head("tiny", "main") == three[0]
    listed = client.get("/v1/streams/tiny/main/versions", headers=AUTH).json()["versions"]
    assert [(v["id"], v["in_lineage"], v["head"]) for v in listed] == [
        (three[2], False, False),
        (three[1], False, False),
        (three[0], True, True),
    ]

    # a version rolled back past is no longer an ancestor of the head
    forward = client.post(url, json={"version": three[2]}, headers=AUTH_ADMIN)
    assert (forward.status_code, forward.json()["error"]["field"]) == (409, "version")
    base = client.post(url, json={"version": None}, headers=AUTH_ADMIN)
    assert base.status_code == 200 and base.json()["head"] is None


def test_rollback_refusals(client, store, three):
    url = "/v1/streams/tiny/main/rollback"
    missing = client.post(url, json={"version": "v" + "f" * 26}, headers=AUTH_ADMIN)
    assert (missing.status_code, missing.json()["error"]["field"]) == (404, "version")
    malformed = client.post(url, json={"version": "../x"}, headers=AUTH_ADMIN)
    assert (malformed.status_code, malformed.json()["error"]["field"]) == (422, "version")
    no_field = client.post(url, json={}, headers=AUTH_ADMIN)
    assert (no_field.status_code, no_field.json()["error"]["field"]) == (422, "version")
    nostream = client.post(
        "/v1/streams/tiny/x/rollback", json={"version": None}, headers=AUTH_ADMIN
    )
    assert nostream.status_code == 404
    assert store.head("tiny", "main") == three[2]


def test_models_list_streams_and_curvature(client, store, redis, tmp_path, three):
    redis.delete(curvature_index_key("tiny"))  # no worker has recorded its curvature
    # curvature for the model's base fingerprint, as the engine files it
    base_fp = "f" * 64
    make_version(store, "tiny", "side", 1.0)
    path = tmp_path / "curvature.safetensors"
    path.write_bytes(b"not parsed by the API")
    fields = {
        "model_fingerprint": base_fp,
        "layers": ["model.layers.1.mlp.down_proj"],
        "corpus_digest": "c" * 64,
        "tokens": 1000,
        "labels": "empirical",
        "kind": "kfac",
        "format_version": 1,
    }
    key = store.put_curvature(path, fields)["key"]

    models = client.get("/v1/models", headers=AUTH).json()["models"]
    assert [m["name"] for m in models] == ["other", "tiny"]
    tiny = models[1]
    assert tiny["layers"] == ["model.layers.1.mlp.down_proj"]
    assert tiny["queue"] == "crispedit:tiny"
    assert {(s["stream"], s["head"]) for s in tiny["streams"]} >= {("main", three[2])}
    # no version records this fingerprint, so it is not matched yet
    assert tiny["curvature_status"] == "none"

    client.app.state.settings.models["tiny"].fingerprint = base_fp
    tiny = client.get("/v1/models", headers=AUTH_TINY).json()["models"]
    assert [m["name"] for m in tiny] == ["tiny"]
    assert tiny[0]["curvature_status"] == "cached"
    assert [c["key"] for c in tiny[0]["curvature"]] == [key]


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte flipped in the tensor data: still valid safetensors, wrong numbers
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupted_delta_is_a_json_error_not_a_file(client, store, settings, three, how):
    for version in three:  # served once intact, so the app has hashed and remembered them
        assert client.get(f"/v1/versions/{version}/delta", headers=AUTH).status_code == 200
    _damage(store.root / "versions" / three[1] / DELTA_FILE, how)
    for version, against in ((three[1], "parent"), (three[2], "base"), (three[1], "base")):
        response = client.get(
            f"/v1/versions/{version}/delta?against={against}",
            headers={**AUTH, "If-None-Match": "*"},  # no 304 for a file that fails verification
        )
        assert response.status_code == 500, (version, against, response.status_code)
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == "corrupt"
        assert f"versions/{three[1]}/{DELTA_FILE}" in error["message"]
        for leak in (str(settings.store_dir), "Traceback", "/tmp"):
            assert leak not in response.text
    # the undamaged parent is still served
    assert client.get(f"/v1/versions/{three[0]}/delta", headers=AUTH).status_code == 200


def test_the_cumulative_cache_is_bounded_least_recently_used_first(
    settings, store, three, monkeypatch
):
    cache = settings.cumulative_cache_dir
    cumulative = deltas.cumulative_delta(store, cache, three[0])[0]  # all three: the same size
    size = cumulative.stat().st_size
    bounded = settings.model_copy(update={"cache_max_bytes": 2 * size + size // 2})

    def download(version: str) -> bytes:
        response = client.get(f"/v1/versions/{version}/delta?against=base", headers=AUTH)
        assert response.status_code == 200
        time.sleep(0.02)  # distinct last-use times
        return response.content

    def cached() -> set[str]:
        return {path.stem for path in cache.glob("*.safetensors")}

    with TestClient(create_app(bounded)) as client:
        first = download(three[0])
        download(three[1])
        download(three[2])  # over the bound, but every entry was used a moment ago
        assert cached() == set(three)
        monkeypatch.setattr(deltas, "EVICT_GRACE_S", 0.0)
        for path in cache.glob("*.safetensors"):
            path.unlink()
        for path in cache.glob("*.json"):
            path.unlink()
        download(three[0])
        download(three[1])
        assert download(three[0]) == first  # a hit: three[0] is now the most recently used
        download(three[2])
        assert cached() == {three[0], three[2]}  # three[1], the least recently used, went
        assert set(path.stem for path in cache.glob("*.json")) == cached()
        download(three[1])  # recomputed after its eviction
        assert cached() == {three[1], three[2]}


def test_a_corrupted_cumulative_cache_is_recomputed_not_served(client, store, settings, three):
    url = f"/v1/versions/{three[2]}/delta?against=base"
    first = client.get(url, headers=AUTH)
    cached = settings.cumulative_cache_dir / f"{three[2]}.safetensors"
    _damage(cached, "flip")  # same size: only the hash can tell
    again = client.get(url, headers=AUTH)
    assert again.status_code == 200
    assert again.headers["etag"] == first.headers["etag"]
    assert hashlib.sha256(again.content).hexdigest() == again.headers["etag"].strip('"')
    assert again.content == first.content
    _damage(cached, "truncate")
    third = client.get(url, headers=AUTH)
    assert hashlib.sha256(third.content).hexdigest() == third.headers["etag"].strip('"')


def test_list_streams_shows_only_what_the_key_may_read(client, store, three):
    other = make_version(store, "other", "team-b", 1.0)["id"]
    make_version(store, "retired", "main", 1.0)  # in the store, but no longer served
    store.rollback("tiny", "main", three[0])
    every = client.get("/v1/streams", headers=AUTH)
    assert every.status_code == 200
    listed = every.json()["streams"]
    assert [(s["model"], s["stream"]) for s in listed] == [("other", "team-b"), ("tiny", "main")]
    tiny = listed[1]
    assert (tiny["head"], tiny["versions"]) == (three[0], 1)  # rolled back: one in the lineage
    assert tiny["updated_at"] == store.head_info("tiny", "main")["moved_at"]
    assert listed[0]["head"] == other

    only = client.get("/v1/streams", headers=AUTH_TINY).json()["streams"]
    assert [(s["model"], s["stream"]) for s in only] == [("tiny", "main")]
    narrowed = client.get("/v1/streams", params={"model": "other"}, headers=AUTH).json()
    assert [s["stream"] for s in narrowed["streams"]] == ["team-b"]


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("a..b", 400, "invalid_name"),
        ("gpt-9", 404, "unknown_model"),
        ("other", 404, "unknown_model"),
    ],
)
def test_list_streams_bad_model_filter(client, store, model, status, code):
    make_version(store, "other", "main", 1.0)
    response = client.get("/v1/streams", params={"model": model}, headers=AUTH_TINY)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["field"] == "model"


def test_list_streams_needs_a_key(client):
    assert client.get("/v1/streams").status_code == 401
    assert client.get("/v1/streams", headers=AUTH).json() == {"streams": []}
