"""Merged checkpoints through the API with a real Redis and RQ worker: POST queues one job per
version, the job's status is at /v1/jobs, the files are listed with sha256 and served with range
requests; retention keeps the newest; bad ids, names and ranges are clear 4xx errors."""

from __future__ import annotations

import hashlib

import pytest
from api_helpers import AUTH, AUTH_TINY, KEY_ALL, job_count, make_version, run_worker

from curvature_store.checkpoints import checkpoint_dir, list_checkpoints
from service.client import ApiError, CrispEditClient

SHARD = "model-00001-of-00002.safetensors"
SHARD_BYTES = bytes(range(256)) * 40


@pytest.fixture
def version(store) -> str:
    return make_version(store, "tiny", "main", 1.0)["id"]


def checkpoint(client, redis, version_id: str) -> dict:
    """POST the checkpoint, run the worker, return the finished job's view."""
    accepted = client.post(f"/v1/versions/{version_id}/checkpoint", headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["status"] == "queued" and body["url"] == f"/v1/jobs/{body['job_id']}"
    assert accepted.headers["location"] == body["url"]
    run_worker(redis)
    return client.get(body["url"], headers=AUTH).json()


def test_a_checkpoint_is_written_by_a_job_listed_and_served(client, redis, store, version):
    # before: nothing to list
    none = client.get(f"/v1/versions/{version}/checkpoint", headers=AUTH)
    assert (none.status_code, none.json()["error"]["code"]) == (404, "no_checkpoint")
    # two requests before the worker runs share one job
    first = client.post(f"/v1/versions/{version}/checkpoint", headers=AUTH).json()
    second = client.post(f"/v1/versions/{version}/checkpoint", headers=AUTH).json()
    assert first["job_id"] == second["job_id"]
    run_worker(redis)
    job = client.get(first["url"], headers=AUTH).json()
    assert (job["type"], job["status"], job["version"]) == ("checkpoint", "succeeded", version)

    listing = client.get(f"/v1/versions/{version}/checkpoint", headers=AUTH)
    assert listing.status_code == 200
    body = listing.json()
    assert (body["version"], body["model"], body["stream"]) == (version, "tiny", "main")
    files = {f["name"]: f for f in body["files"]}
    assert sorted(files) == ["config.json", SHARD, "model-00002-of-00002.safetensors"]
    assert files[SHARD]["sha256"] == hashlib.sha256(SHARD_BYTES).hexdigest()
    assert body["bytes"] == sum(f["bytes"] for f in files.values())

    whole = client.get(files[SHARD]["url"], headers=AUTH)
    assert whole.status_code == 200 and whole.content == SHARD_BYTES
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["etag"] == f'"{files[SHARD]["sha256"]}"'
    # resuming a broken download: the rest from byte 1000
    part = client.get(files[SHARD]["url"], headers={**AUTH, "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == SHARD_BYTES[1000:]
    assert part.headers["content-range"] == f"bytes 1000-{len(SHARD_BYTES) - 1}/{len(SHARD_BYTES)}"
    middle = client.get(files[SHARD]["url"], headers={**AUTH, "Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == SHARD_BYTES[10:20]
    outside = client.get(files[SHARD]["url"], headers={**AUTH, "Range": "bytes=99999-"})
    assert outside.status_code == 416

    # once written, a POST answers 200 and queues nothing
    jobs = job_count(redis)
    again = client.post(f"/v1/versions/{version}/checkpoint", headers=AUTH)
    assert again.status_code == 200 and again.json()["status"] == "ready"
    assert job_count(redis) == jobs


def test_retention_keeps_the_newest_checkpoints(client, redis, store):
    versions = [make_version(store, "tiny", "main", v)["id"] for v in (1.0, 2.0, 3.0)]
    for v in versions:
        assert checkpoint(client, redis, v)["status"] == "succeeded"
    assert [m["version"] for m in list_checkpoints(store)] == versions[:0:-1]  # kept 2
    assert not checkpoint_dir(store, versions[0]).exists()
    gone = client.get(f"/v1/versions/{versions[0]}/checkpoint", headers=AUTH)
    assert gone.status_code == 404


@pytest.mark.parametrize(
    "name",
    ["nope.json", "%2E%2E", "..%2F..%2Fstore.json", "checkpoint.json%00", ".hidden", "x" * 300],
)
def test_unknown_or_hostile_file_names_are_404(client, redis, store, version, name):
    checkpoint(client, redis, version)
    response = client.get(f"/v1/versions/{version}/checkpoint/files/{name}", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] in ("not_found", "not_found_route")


def test_bad_unknown_and_forbidden_versions(client, redis, store, version):
    jobs = job_count(redis)
    missing = client.post(f"/v1/versions/v{'0' * 26}/checkpoint", headers=AUTH)
    assert (missing.status_code, missing.json()["error"]["field"]) == (404, "version_id")
    malformed = client.post("/v1/versions/v1/checkpoint", headers=AUTH)
    assert (malformed.status_code, malformed.json()["error"]["field"]) == (400, "version_id")
    other = make_version(store, "other", "main", 1.0)["id"]
    assert client.post(f"/v1/versions/{other}/checkpoint", headers=AUTH_TINY).status_code == 404
    assert client.get(f"/v1/versions/{other}/checkpoint", headers=AUTH_TINY).status_code == 404
    unserved = make_version(store, "gone", "main", 1.0)["id"]  # a model no worker serves now
    refused = client.post(f"/v1/versions/{unserved}/checkpoint", headers=AUTH)
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "unknown_model")
    assert job_count(redis) == jobs


def test_the_client_writes_waits_and_downloads_resuming_a_broken_file(
    live_server, redis, version, tmp_path
):
    with CrispEditClient(live_server, KEY_ALL) as api:
        accepted = api.create_checkpoint(version)
        assert accepted["status"] == "queued"
        run_worker(redis)
        assert api.wait(accepted["job_id"], timeout=30)["status"] == "succeeded"
        assert api.create_checkpoint(version)["status"] == "ready"
        out = api.download_checkpoint(version, tmp_path / "model")
        assert (out / SHARD).read_bytes() == SHARD_BYTES
        # a broken download: half a shard as .part, and a corrupt one
        (out / SHARD).unlink()
        (out / f"{SHARD}.part").write_bytes(SHARD_BYTES[:1234])
        (out / "config.json").write_text("tampered")
        api.download_checkpoint(version, out)
        assert (out / SHARD).read_bytes() == SHARD_BYTES
        assert (out / "config.json").read_text() == '{"model_type": "llama"}'
        assert sorted(p.name for p in out.iterdir()) == [
            "config.json", SHARD, "model-00002-of-00002.safetensors",
        ]  # fmt: skip
        with pytest.raises(ApiError) as err:
            api.checkpoint(f"v{'0' * 26}")
        assert err.value.status == 404


def test_the_cli_writes_and_downloads_a_checkpoint(live_server, redis, version, tmp_path, capsys):
    from crispedit_cli.main import main

    api = ["--api", live_server, "--key", KEY_ALL]
    assert main(["checkpoint", *api, version]) == 0
    assert "job " in capsys.readouterr().out
    run_worker(redis)
    assert main(["checkpoint", *api, version, "--out", str(tmp_path / "m")]) == 0
    assert "3 files" in capsys.readouterr().out
    assert (tmp_path / "m" / SHARD).read_bytes() == SHARD_BYTES
    assert main(["checkpoint", *api, f"v{'0' * 26}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "404" in err
