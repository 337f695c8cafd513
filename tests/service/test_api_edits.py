"""POST /v1/edits: accepted edits become RQ jobs in stream order; bad ones change nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_helpers import AUTH, edit_body, fact, job_count, make_version, run_worker
from jobs_for_tests import ORDER_KEY
from rq import Queue
from rq.job import Job, JobStatus

from contract.jobs import queue_name


def test_accepted_edit_is_a_job_with_the_documented_payload(client, redis):
    body = edit_body(
        2,
        stream="team-a",
        options={
            "method": "kfac",
            "gamma": 0.8,
            "epochs": 5,
            "lr_schedule": "cosine",
            "anchors": 0,
            "anchor_choice": "similar",
            "clip": 0.005,
            "drift_budget": 1e-3,
            "evaluate": True,
        },
    )
    body["facts"][1] = {"prompt": "The Eiffel Tower is in", "object": " Rome ", "paraphrases": []}
    response = client.post("/v1/edits", json=body, headers=AUTH)

    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["url"] == f"/v1/jobs/{job_id}" == response.headers["location"]
    queue = Queue(queue_name("tiny"), connection=redis)
    assert queue.job_ids == [job_id]

    job = Job.fetch(job_id, connection=redis)
    assert job.func_name == "jobs_for_tests.apply_edit"
    (payload,) = job.args
    assert set(payload) == {
        "model",
        "stream",
        "facts",
        "parent_version",
        "check_parent",
        "options",
        "submitted_at",
        "key_name",
        "actor",
    }
    assert (payload["model"], payload["stream"], payload["key_name"]) == ("tiny", "team-a", "all")
    assert payload["options"] == {
        "method": "kfac",
        "gamma": 0.8,
        "epochs": 5,
        "lr_schedule": "cosine",
        "anchors": 0,  # a zero the client set is kept
        "anchor_choice": "similar",
        "clip": 0.005,
        "drift_budget": 1e-3,
        "evaluate": True,
    }
    assert (payload["parent_version"], payload["check_parent"]) == (None, False)
    # facts arrive as the engine's canonical records; P36 became its template
    assert payload["facts"][0] == {
        "prompt": "The capital of France is",
        "target": "City0",
        "subject": "France",
        "paraphrases": [],
        "neighbors": [],
        "ground_truth": None,
    }
    assert payload["facts"][1]["prompt"] == "The Eiffel Tower is in"
    assert payload["facts"][1]["target"] == "Rome"
    assert job.meta["model"] == "tiny" and job.meta["n_facts"] == 2
    assert job.timeout == 3600


def test_relation_phrase_and_template_follow_the_engine_rules(client, redis):
    facts = [
        fact(relation="{} was designed by", target="Gustave"),
        fact(relation="is a country in", target="Asia"),
    ]
    response = client.post("/v1/edits", json=edit_body(facts=facts), headers=AUTH)
    assert response.status_code == 202
    (payload,) = Job.fetch(response.json()["job_id"], connection=redis).args
    assert [f["prompt"] for f in payload["facts"]] == [
        "France was designed by",
        "France is a country in",
    ]


def test_idempotency_key_returns_the_same_job(client, redis):
    headers = {**AUTH, "Idempotency-Key": "retry-1"}
    first = client.post("/v1/edits", json=edit_body(), headers=headers)
    again = client.post("/v1/edits", json=edit_body(), headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert job_count(redis) == 1

    other_body = client.post("/v1/edits", json=edit_body(2), headers=headers)
    assert other_body.status_code == 409
    assert other_body.json()["error"]["code"] == "idempotency_key_reused"
    assert job_count(redis) == 1

    # a replay is answered even after the job ran and moved the head
    run_worker(redis)
    late = client.post("/v1/edits", json=edit_body(), headers=headers)
    assert late.status_code == 200 and late.json()["job_id"] == first.json()["job_id"]


def test_jobs_of_one_stream_run_in_submission_order(client, redis, store):
    ids = [
        client.post("/v1/edits", json=edit_body(n), headers=AUTH).json()["job_id"]
        for n in (1, 2, 3)
    ]
    elsewhere = client.post("/v1/edits", json=edit_body(stream="b"), headers=AUTH).json()["job_id"]

    statuses = [Job.fetch(i, connection=redis).get_status() for i in ids]
    assert statuses == [JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.DEFERRED]
    assert Job.fetch(elsewhere, connection=redis).get_status() == JobStatus.QUEUED
    second = client.get(f"/v1/jobs/{ids[1]}", headers=AUTH).json()
    assert (second["status"], second["waiting_for"]) == ("queued", ids[0])

    run_worker(redis)
    ran = [item.decode() for item in redis.lrange(ORDER_KEY, 0, -1)]
    assert [i for i in ran if i in ids] == ids
    lineage = store.lineage("tiny", "main")
    assert [doc["metrics"]["n_edits"] for doc in lineage] == [3, 2, 1]  # newest first


def test_a_failed_job_does_not_block_the_next_one_on_its_stream(client, redis, settings):
    settings.job_function = "jobs_for_tests.fail_edit"
    failing = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    settings.job_function = "jobs_for_tests.apply_edit"
    after = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    run_worker(redis)
    assert client.get(f"/v1/jobs/{failing}", headers=AUTH).json()["status"] == "failed"
    assert client.get(f"/v1/jobs/{after}", headers=AUTH).json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"model": "tiny"}, "facts", "invalid_request"),
        (edit_body(facts=[]), "facts", "invalid_request"),
        (edit_body(6), "facts", "too_many_facts"),
        (edit_body(facts=[fact(target="   ")]), "facts[0].target", "invalid_fact"),
        (edit_body(facts=[fact(), fact(target=None)]), "facts[1].target", "invalid_fact"),
        (edit_body(facts=[fact(relation="P9999")]), "facts[0].relation", "unknown_relation"),
        (edit_body(facts=[fact(subject=None)]), "facts[0].subject", "invalid_fact"),
        (edit_body(facts=[fact(prompt="x is")]), "facts[0].prompt", "invalid_fact"),
        (edit_body(facts=[fact(target=7)]), "facts[0].target", "invalid_request"),
        (edit_body(facts=[fact(colour="red")]), "facts[0].colour", "invalid_request"),
        (
            edit_body(facts=[fact(neighbors=[{"prompt": "a", "target": ""}])]),
            "facts[0].neighbors[0].target",
            "invalid_fact",
        ),
        (edit_body(stream="a..b"), "stream", "invalid_request"),
        (edit_body(stream="../etc"), "stream", "invalid_request"),
        (edit_body(parent_version="v1"), "parent_version", "invalid_request"),
        (edit_body(options={"gamma": 1.5}), "options.gamma", "invalid_request"),
        (edit_body(options={"method": "rome"}), "options.method", "invalid_request"),
        (edit_body(options={"epochs": 0}), "options.epochs", "invalid_request"),
        (edit_body(options={"lr": 0}), "options.lr", "invalid_request"),
        (edit_body(options={"lr_schedule": "linear"}), "options.lr_schedule", "invalid_request"),
        (
            edit_body(options={"method": "alphaedit", "lr_schedule": "cosine"}),
            "options.lr_schedule",
            "invalid_request",
        ),
        (edit_body(options={"anchors": 9}), "options.anchors", "invalid_request"),
        (edit_body(options={"anchors": 1.5}), "options.anchors", "invalid_request"),
        (edit_body(options={"anchor_weight": -1}), "options.anchor_weight", "invalid_request"),
        (
            edit_body(options={"anchor_choice": "nearest"}),
            "options.anchor_choice",
            "invalid_request",
        ),
        (edit_body(options={"anchor_choice": 1}), "options.anchor_choice", "invalid_request"),
        (edit_body(options={"clip": 1}), "options.clip", "invalid_request"),
        (edit_body(options={"consolidate": -0.1}), "options.consolidate", "invalid_request"),
        (edit_body(options={"consolidate": 101}), "options.consolidate", "invalid_request"),
        (edit_body(options={"method": "ekfac", "clip": 0.1}), "options.clip", "invalid_request"),
        (edit_body(options={"drift_budget": -1e-3}), "options.drift_budget", "invalid_request"),
        (edit_body(options={"drift_budget": 1.5}), "options.drift_budget", "invalid_request"),
        (
            edit_body(options={"method": "memit", "drift_budget": 1e-3}),
            "options.drift_budget",
            "invalid_request",
        ),
    ],
)
def test_invalid_bodies_are_422_with_the_field_and_enqueue_nothing(
    client, redis, body, field, code
):
    response = client.post("/v1/edits", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["field"], error["code"]) == (field, code)
    assert error["message"]
    assert job_count(redis) == 0


@pytest.mark.parametrize(
    ("facts", "field"),
    [
        ([fact(subject="s" * 2000, relation="{}" * 1000)], "facts[0].relation"),
        ([fact(), fact(subject="s" * 1500, relation="{} and {}")], "facts[1].relation"),
        ([{"prompt": "\U0001f600" * 700, "target": "t"}], "facts[0].prompt"),
        ([fact(target="t" * 2000, paraphrases=["p" * 100])], "facts[0].paraphrases[0]"),
    ],
)
def test_facts_over_the_size_limits_are_400_before_anything_is_queued(client, redis, facts, field):
    response = client.post("/v1/edits", json=edit_body(facts=facts), headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("fact_too_long", field)
    assert job_count(redis) == 0


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (fact(target="\x00"), "facts[0].target"),
        (fact(target="Lyon\x1b[2J"), "facts[0].target"),
        (fact(subject="Fr\u200bance"), "facts[0].subject"),
        ({"prompt": "The capital of France is\u202e", "target": "Lyon"}, "facts[0].prompt"),
        (fact(relation="{} has\x7f"), "facts[0].relation"),
    ],
)
def test_control_characters_are_400_naming_the_field(client, redis, record, field):
    response = client.post("/v1/edits", json=edit_body(facts=[record]), headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("control_character", field)
    assert job_count(redis) == 0


def test_layers_are_refused_unless_they_are_the_served_ones(client, redis):
    served = ["model.layers.1.mlp.down_proj"]
    for model, layers, words in (
        ("tiny", ["model.layers.2.mlp.down_proj"], "edit layers ['model.layers.1.mlp.down_proj']"),
        ("tiny", [*served, "model.layers.2.mlp.down_proj"], "GET /v1/models"),
        ("other", served, "does not configure"),
    ):
        body = edit_body(model=model, options={"layers": layers})
        response = client.post("/v1/edits", json=body, headers=AUTH)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["field"]) == ("layers_not_served", "options.layers")
        assert words in error["message"]
    assert job_count(redis) == 0
    same = client.post("/v1/edits", json=edit_body(options={"layers": served}), headers=AUTH)
    assert same.status_code == 202
    assert job_count(redis) == 1


def test_malformed_json_and_wrong_content_type(client, redis):
    broken = client.post(
        "/v1/edits",
        content=b'{"model": "tiny", "facts": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_request"
    form = client.post("/v1/edits", data={"model": "tiny"}, headers=AUTH)
    assert form.status_code == 415
    assert form.json()["error"]["code"] == "unsupported_media_type"
    assert job_count(redis) == 0


def test_oversized_bodies_are_413(client, redis):
    big = edit_body(facts=[fact(paraphrases=["x" * 1000] * 20)])
    response = client.post("/v1/edits", json=big, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit applies to what arrives
        yield b'{"model": "tiny", "facts": ['
        for _ in range(40):
            yield b'{"prompt": "' + b"y" * 1000 + b'", "target": "z"},'
        yield b'{"prompt": "a", "target": "b"}]}'

    streamed = client.post(
        "/v1/edits", content=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert job_count(redis) == 0


def test_unknown_model_is_404(client, redis):
    response = client.post("/v1/edits", json=edit_body(model="gpt-9"), headers=AUTH)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "unknown_model",
        "message": "model 'gpt-9' is not served",
        "field": "model",
    }
    assert job_count(redis) == 0


def test_parent_version_must_be_the_head(client, redis, store):
    stale = client.post("/v1/edits", json=edit_body(parent_version=None), headers=AUTH)
    assert stale.status_code == 202  # explicit null: the stream must be at the base, and is

    version = make_version(store, "tiny", "main", 1.0)["id"]
    stale = client.post("/v1/edits", json=edit_body(parent_version=None), headers=AUTH)
    assert stale.status_code == 409
    error = stale.json()["error"]
    assert (error["code"], error["field"], error["head"]) == (
        "stale_parent",
        "parent_version",
        version,
    )
    assert job_count(redis) == 1

    fresh = client.post("/v1/edits", json=edit_body(parent_version=version), headers=AUTH)
    assert fresh.status_code == 202
    (payload,) = Job.fetch(fresh.json()["job_id"], connection=redis).args
    assert (payload["parent_version"], payload["check_parent"]) == (version, True)


def test_concurrent_submissions_form_one_chain(live_server, redis, store):
    """Real HTTP, 8 clients at once on one stream: the jobs run one at a time, in one chain."""
    http = httpx.Client(base_url=live_server, headers=AUTH, timeout=10)
    with http, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/edits", json=edit_body()), range(8)))
    assert [r.status_code for r in responses] == [202] * 8
    ids = {r.json()["job_id"] for r in responses}
    after = {i: Job.fetch(i, connection=redis).meta["after"] for i in ids}
    # exactly one first job, and every other job follows a distinct job of the set
    assert list(after.values()).count(None) == 1
    followed = [a for a in after.values() if a is not None]
    assert len(set(followed)) == 7 and set(followed) < ids
    chain = [next(i for i, a in after.items() if a is None)]
    while len(chain) < 8:
        chain.append(next(i for i, a in after.items() if a == chain[-1]))

    run_worker(redis)
    assert [item.decode() for item in redis.lrange(ORDER_KEY, 0, -1)] == chain
    assert len(store.lineage("tiny", "main")) == 8
