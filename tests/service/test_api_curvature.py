"""Curvature jobs through the API, a real RQ worker and Redis: one build per curvature at a time,
an answer at once when it is built, and edits that wait for the build they need."""

from __future__ import annotations

import pytest
from api_helpers import AUTH, AUTH_ADMIN, AUTH_TINY, edit_body, job_count, run_worker
from jobs_for_tests import ORDER_KEY
from rq import Queue
from rq.job import Job

from contract.jobs import curvature_index_key, curvature_spec, queue_name

BODY = {"model": "tiny", "kind": "kfac", "tokens": 5000, "corpus": "/data/wiki/*.jsonl"}


@pytest.fixture
def unbuilt(redis):
    """No curvature of "tiny" is recorded as built (a fresh deployment)."""
    redis.delete(curvature_index_key("tiny"))


def test_a_curvature_job_builds_once_then_answers_with_its_key(client, redis, store, unbuilt):
    first = client.post("/v1/curvature", json=BODY, headers=AUTH_ADMIN)
    assert first.status_code == 202
    job_id = first.json()["job_id"]
    assert first.json()["status"] == "queued" and first.headers["location"] == f"/v1/jobs/{job_id}"
    # the same request while it is queued: the same job, not a second build
    again = client.post("/v1/curvature", json=BODY, headers=AUTH_ADMIN)
    assert (again.status_code, again.json()["job_id"]) == (202, job_id)
    other = client.post("/v1/curvature", json={**BODY, "kind": "ekfac"}, headers=AUTH_ADMIN)
    assert other.json()["job_id"] != job_id
    assert Queue(queue_name("tiny"), connection=redis).count == 2  # on the model's queue

    view = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert (view["type"], view["status"], view["model"]) == ("curvature", "queued", "tiny")
    assert view["curvature_key"] is None
    models = client.get("/v1/models", headers=AUTH).json()["models"]
    assert {m["name"]: m["curvature_status"] for m in models}["tiny"] == "building"

    run_worker(redis)
    done = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert done["status"] == "succeeded"
    assert done["progress"] == {"phase": "curvature", "tokens_done": 100, "tokens_total": 100}
    key = done["curvature_key"]
    assert store.curvature_file(key).is_file()
    built = client.post("/v1/curvature", json=BODY, headers=AUTH_ADMIN)
    assert built.status_code == 200
    assert built.json() == {
        "model": "tiny", "kind": "kfac", "status": "built", "key": key, "job_id": None, "url": None
    }  # fmt: skip
    tiny = {m["name"]: m for m in client.get("/v1/models", headers=AUTH).json()["models"]}["tiny"]
    assert tiny["curvature_status"] == "cached" and key in {c["key"] for c in tiny["curvature"]}

    # removed from the store since: built again, not answered with a key that is gone
    store.remove_curvature(key)
    rebuilt = client.post("/v1/curvature", json=BODY, headers=AUTH_ADMIN)
    assert rebuilt.status_code == 202 and rebuilt.json()["job_id"] != job_id


def test_a_curvature_request_is_checked_before_anything_is_enqueued(client, redis, unbuilt):
    cases = [
        ({**BODY, "model": "nope"}, AUTH_ADMIN, 404, "model"),
        ({**BODY, "model": "other"}, AUTH_TINY, 404, "model"),
        ({**BODY, "model": "tiny"}, AUTH_TINY, 404, "model"),  # edit role: no builds,
        ({**BODY, "kind": "fisher"}, AUTH_ADMIN, 422, "kind"),
        ({**BODY, "tokens": 1}, AUTH_ADMIN, 422, "tokens"),
        ({**BODY, "corpus": ""}, AUTH_ADMIN, 422, "corpus"),
        ({**BODY, "layers": "1-3"}, AUTH_ADMIN, 422, "layers"),
    ]
    for body, auth, status, field in cases:
        response = client.post("/v1/curvature", json=body, headers=auth)
        assert response.status_code == status, body
        assert response.json()["error"]["field"] == field
    assert job_count(redis) == 0


def test_an_edit_waits_for_the_curvature_it_needs(client, redis, settings, unbuilt):
    """Without its curvature built, an edit depends on the build (one, whatever the number of
    edits) and runs after it; a method that needs none (ft) does not wait."""
    edits = [client.post("/v1/edits", json=edit_body(), headers=AUTH).json() for _ in range(2)]
    ft = client.post(
        "/v1/edits", json=edit_body(stream="ft", options={"method": "ft"}), headers=AUTH
    ).json()
    first = client.get(f"/v1/jobs/{edits[0]['job_id']}", headers=AUTH).json()
    assert (first["status"], first["rq_status"]) == ("queued", "deferred")
    build = first["waiting_for"]
    assert Job.fetch(build, connection=redis).meta["job_type"] == "curvature"
    assert Job.fetch(edits[1]["job_id"], connection=redis).meta["curvature_job"] == build
    assert client.get(f"/v1/jobs/{ft['job_id']}", headers=AUTH).json()["rq_status"] == "queued"
    # ft with a Laplace penalty edits under the curvature: it waits too (curvature_kind)
    options = {"method": "ft", "laplace": 1.0}
    penalised = client.post(
        "/v1/edits", json=edit_body(stream="ftl", options=options), headers=AUTH
    ).json()
    assert Job.fetch(penalised["job_id"], connection=redis).meta["curvature_job"] == build
    # and so does ft consolidated under it (crispedit.consolidate)
    options = {"method": "ft", "consolidate": 1.0}
    consolidated = client.post(
        "/v1/edits", json=edit_body(stream="ftc", options=options), headers=AUTH
    ).json()
    assert Job.fetch(consolidated["job_id"], connection=redis).meta["curvature_job"] == build

    run_worker(redis)
    order = [j.decode() for j in redis.lrange(ORDER_KEY, 0, -1)]
    assert order.index(build) < order.index(edits[0]["job_id"]) < order.index(edits[1]["job_id"])
    for edit in edits:
        assert client.get(f"/v1/jobs/{edit['job_id']}", headers=AUTH).json()["status"] == (
            "succeeded"
        )
    assert redis.hget(curvature_index_key("tiny"), curvature_spec("kfac")) is not None
    # built now: the next edit is queued at once
    later = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()
    assert Job.fetch(later["job_id"], connection=redis).meta["curvature_job"] is None


def test_an_edit_whose_build_failed_still_runs_and_is_not_stuck(client, redis, settings, unbuilt):
    """A failed build releases the edits that waited for it (the worker's edit then fails with a
    clear error, see tests/workers); the next edit starts a new build."""
    settings.curvature_function = "jobs_for_tests.fail_curvature"
    edit = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()
    build = Job.fetch(edit["job_id"], connection=redis).meta["curvature_job"]
    run_worker(redis)
    failed = client.get(f"/v1/jobs/{build}", headers=AUTH).json()
    assert failed["status"] == "failed" and "missing.jsonl" in failed["error"]
    assert client.get(f"/v1/jobs/{edit['job_id']}", headers=AUTH).json()["rq_status"] == "finished"
    settings.curvature_function = "jobs_for_tests.build_curvature"
    retry = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()
    assert Job.fetch(retry["job_id"], connection=redis).meta["curvature_job"] not in (None, build)
