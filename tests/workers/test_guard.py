"""Guarded publishing and completions at a version, through the API (TestClient), real Redis and
RQ, and the real worker code on the resident tiny model: a version outside the stream's policy is
kept and the head stays; force publishes it; bad input changes nothing."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from live import redis_db, redis_url, serve, wait_for
from rq import Queue
from rq.job import Job
from worker_helpers import resident_engine, run_burst

from contract.jobs import queue_name
from crispedit.delta import add_to_weights
from crispedit.evaluate import generate_answers
from crispedit.models import load_model
from crispedit_cli.main import main
from service.client import ApiError, CrispEditClient
from service.config import Settings
from service.keys import hash_key
from service.main import create_app

REDIS_URL = redis_url(8)
KEY = "guard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPTIONS = {"epochs": 3, "lr": 0.03}
IMPOSSIBLE = {"prompt": "The capital of France is", "answer": "zebra quokka narwhal"}


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    """(TestClient, engine, redis): the app and a resident engine on one store and Redis."""
    with (
        redis_db(REDIS_URL) as redis,
        resident_engine(tmp_path / "store", tiny_model_dir, build_curvature="kfac") as engine,
    ):
        settings = Settings(
            redis_url=REDIS_URL,
            store_dir=tmp_path / "store",
            api_keys={
                hash_key(KEY): {
                    "name": "guard-admin",
                    "grants": [{"model": "tiny", "stream": "*", "role": "admin"}],
                }
            },
            models={"tiny": {}},
        )
        with TestClient(create_app(settings)) as client:
            yield client, engine, redis


def edit(client, redis, target: str, **options) -> dict:
    fact = {"prompt": "The Eiffel Tower is located in", "target": target}
    body = {"model": "tiny", "facts": [fact], "options": {**OPTIONS, **options}}
    answer = client.post("/v1/edits", json=body, headers=AUTH)
    assert answer.status_code == 202, answer.text
    run_burst(redis)
    return client.get(answer.json()["url"], headers=AUTH).json()


def test_outside_the_policy_the_version_is_held_and_force_publishes_it(stack):
    client, engine, redis = stack
    first = edit(client, redis, "Rome")
    assert first["status"] == "succeeded" and first["result"]["guard"] is None

    policy = {"min_efficacy": 0.0, "regression": [IMPOSSIBLE]}
    answer = client.put("/v1/streams/tiny/main/policy", json=policy, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["regression"] == [IMPOSSIBLE] and answer.json()["heldout_tokens"] == 2048

    rejected = edit(client, redis, "Berlin")
    assert rejected["status"] == "rejected", rejected
    guard = rejected["result"]["guard"]
    assert not guard["passed"] and not guard["forced"] and guard["seconds"] >= 0
    assert [f["rule"] for f in guard["failed"]] == ["regression"]
    assert guard["failed"][0]["expected"] == IMPOSSIBLE["answer"]
    held = rejected["version"]
    assert engine.store.head("tiny", "main") == first["version"]  # the head stays
    listed = client.get("/v1/streams/tiny/main/versions", headers=AUTH).json()
    assert listed["head"] == first["version"]
    assert [(v["id"], v["held"]) for v in listed["versions"]] == [
        (held, True), (first["version"], False)
    ]  # fmt: skip
    assert client.get(f"/v1/versions/{held}", headers=AUTH).json()["guard"] == guard

    # force is explicit, and only for a held version on the current head
    answer = client.post(f"/v1/versions/{held}/publish", json={"force": False}, headers=AUTH)
    assert (answer.status_code, answer.json()["error"]["field"]) == (400, "force")
    answer = client.post(
        f"/v1/versions/{first['version']}/publish", json={"force": True}, headers=AUTH
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (409, "not_held")
    assert engine.store.head("tiny", "main") == first["version"]
    answer = client.post(f"/v1/versions/{held}/publish", json={"force": True}, headers=AUTH)
    assert answer.status_code == 200 and answer.json()["head"] == held
    log = engine.store.root / "streams" / "tiny" / "main" / "log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["op"], last["forced"], last["actor"]["team"]) == ("publish", True, "guard-admin")

    # an edit with force publishes past the policy, and says so
    forced = edit(client, redis, "Madrid", force=True)
    assert forced["status"] == "succeeded"
    assert forced["result"]["guard"]["forced"] and not forced["result"]["guard"]["passed"]
    assert engine.store.head("tiny", "main") == forced["version"]
    last = json.loads(log.read_text().splitlines()[-1])
    assert (last["op"], last["forced"], last["failed"]) == ("create", True, ["regression"])


def test_a_version_within_the_policy_is_published_with_its_measurements(stack, monkeypatch):
    client, engine, redis = stack
    phases = []
    save_meta = Job.save_meta

    def spy(job):
        phases.append(job.meta.get("progress", {}).get("phase"))
        save_meta(job)

    monkeypatch.setattr(Job, "save_meta", spy)
    policy = {"min_efficacy": 0.0, "max_kl": 1e6, "max_ppl_change_pct": 1e6,
              "min_fact_retention": 0.0, "heldout_tokens": 256, "retention_facts": 10}  # fmt: skip
    assert client.put("/v1/streams/tiny/main/policy", json=policy, headers=AUTH).status_code == 200
    done = edit(client, redis, "Rome")
    assert done["status"] == "succeeded"
    guard = done["result"]["guard"]
    assert guard["passed"] and guard["failed"] == []
    metrics = guard["metrics"]
    assert metrics["kl"] > 0 and metrics["n_tokens"] <= 256 and metrics["retention_facts"] == 10
    assert (
        0 <= metrics["fact_retention"] <= 1 and metrics["efficacy"] == done["metrics"]["efficacy"]
    )
    assert engine.store.head("tiny", "main") == done["version"]
    assert phases[-2:] == ["guard", "done"]  # the check is a phase of its own in the progress


def test_bad_policies_are_refused_naming_the_field_and_change_nothing(stack):
    client, engine, _ = stack
    good = {"max_kl": 0.5}
    assert client.put("/v1/streams/tiny/main/policy", json=good, headers=AUTH).status_code == 200
    for body, field in [
        ({"min_efficacy": 1.5}, "min_efficacy"),
        ({"max_kl": -1}, "max_kl"),
        ({"regression": [{"prompt": "x"}] * 21}, "regression"),
        ({"regression": [{"prompt": ""}]}, "regression[0].prompt"),
        ({"heldout_tokens": 0}, "heldout_tokens"),
    ]:
        answer = client.put("/v1/streams/tiny/main/policy", json=body, headers=AUTH)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["field"] == field
    answer = client.put("/v1/streams/tiny/main/policy", json={"typo": 1}, headers=AUTH)
    assert answer.status_code == 422
    assert client.get("/v1/streams/tiny/main/policy", headers=AUTH).json()["max_kl"] == 0.5
    assert engine.store.policy("tiny", "main") == {**engine.store.policy("tiny", "main"), **good}
    assert client.put("/v1/streams/nope/main/policy", json=good, headers=AUTH).status_code == 404
    assert client.put("/v1/streams/tiny/..%2F/policy", json=good, headers=AUTH).status_code in (
        400, 404
    )  # fmt: skip
    assert client.delete("/v1/streams/tiny/main/policy", headers=AUTH).status_code == 204
    assert client.delete("/v1/streams/tiny/main/policy", headers=AUTH).status_code == 404
    assert client.get("/v1/streams/tiny/main/policy", headers=AUTH).status_code == 404
    assert client.get("/v1/streams/tiny/main/policy").status_code == 401


def test_generate_answers_as_the_version_and_its_parent_and_restores_the_weights(
    stack, tiny_model_dir
):
    client, engine, redis = stack
    first = edit(client, redis, "Rome")
    second = edit(client, redis, "Berlin")
    resident = {k: v.clone() for k, v in engine.model.state_dict().items()}
    prompts = ["The Eiffel Tower is located in", "The capital of France is"]
    answer = client.post(
        f"/v1/versions/{second['version']}/generate",
        json={"prompts": prompts, "max_new_tokens": 6},
        headers=AUTH,
    )
    assert answer.status_code == 202, answer.text
    run_burst(redis)
    job = client.get(answer.json()["url"], headers=AUTH).json()
    assert (job["status"], job["type"], job["version"]) == (
        "succeeded",
        "generate",
        second["version"],
    )
    assert all(torch.equal(v, resident[k]) for k, v in engine.model.state_dict().items())

    # the same completions from a fresh model at each version
    model, tokenizer = load_model(str(tiny_model_dir))
    for side, version in (("parent", first["version"]), ("version", second["version"])):
        cumulative = engine.store.cumulative_delta(version)
        add_to_weights(model, {k: torch.from_numpy(v) for k, v in cumulative.items()})
        expected = generate_answers(model, tokenizer, prompts, 6, whole=True)
        assert [c[side] for c in job["result"]["completions"]] == expected
        add_to_weights(model, {k: -torch.from_numpy(v) for k, v in cumulative.items()})
    assert [c["prompt"] for c in job["result"]["completions"]] == prompts
    assert job["result"]["parent"] == first["version"]


def test_bad_generate_requests_are_refused_and_enqueue_nothing(stack):
    client, engine, redis = stack
    version = edit(client, redis, "Rome")["version"]
    queued = len(Queue(queue_name("tiny"), connection=redis))
    url = f"/v1/versions/{version}/generate"
    for body, status, field in [
        ({"prompts": ["x"] * 21}, 422, "prompts"),
        ({"prompts": []}, 422, "prompts"),
        ({"prompts": ["ok", "  "]}, 422, "prompts[1]"),
        ({"prompts": ["ok"], "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompts": ["ok"], "max_new_tokens": 1000}, 422, "max_new_tokens"),
    ]:
        answer = client.post(url, json=body, headers=AUTH)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["field"] == field
    unknown = "/v1/versions/v" + "0" * 26 + "/generate"
    answer = client.post(unknown, json={"prompts": ["ok"]}, headers=AUTH)
    assert answer.status_code == 404
    answer = client.post("/v1/versions/nope/generate", json={"prompts": ["ok"]}, headers=AUTH)
    assert answer.status_code == 400
    answer = client.post("/v1/versions/v" + "0" * 26 + "/publish", json={"force": True},
                         headers=AUTH)  # fmt: skip
    assert answer.status_code == 404
    assert len(Queue(queue_name("tiny"), connection=redis)) == queued
    assert engine.store.head("tiny", "main") == version


def test_the_client_and_the_command_line(stack, tiny_model_dir, tmp_path, capsys):
    """The typed client over real HTTP (uvicorn), with a worker taking the generate job, and
    `crispedit generate` locally giving the same completions; `crispedit edit` on the guarded
    stream of a store keeps the version and fails, `--force` publishes it."""
    client, engine, redis = stack
    first = edit(client, redis, "Rome")["version"]
    prompts = ["The Eiffel Tower is located in"]

    with serve(client.app) as url, CrispEditClient(url, KEY) as api:
        stored = api.set_policy("tiny", "main", {"regression": [IMPOSSIBLE]})
        assert api.policy("tiny", "main") == stored
        answers = []  # the client waits in a thread; the worker runs here, as in a real one
        thread = threading.Thread(
            target=lambda: answers.append(api.generate(first, prompts, 5, timeout=60))
        )
        thread.start()
        queue = Queue(queue_name("tiny"), connection=redis)
        wait_for(lambda: len(queue) > 0, 30, "the generate job")
        run_burst(redis)
        thread.join(timeout=60)
        (found,) = answers
        with pytest.raises(ApiError) as err:
            api.generate(first, [""] * 2)
        assert (err.value.status, err.value.field) == (422, "prompts[0]")
        api.delete_policy("tiny", "main")
        with pytest.raises(ApiError) as err:
            api.policy("tiny", "main")
        assert err.value.code == "no_policy"
    assert [c["prompt"] for c in found] == prompts

    store = str(engine.store.root)
    assert main(["generate", "--store", store, "--model", str(tiny_model_dir), "--version", first,
                 "--prompt", prompts[0], "--max-new-tokens", "5", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["completions"] == found
    assert main(["generate", "--store", store, "--model", str(tiny_model_dir), "--version", first,
                 "--prompt", ""]) == 2  # fmt: skip
    assert "prompts[0]" in capsys.readouterr().err

    # the command line's own edits on a guarded stream of the store
    name = tiny_model_dir.name
    engine.store.set_policy(name, "main", {"regression": [IMPOSSIBLE]})
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{"prompt": "Ice is", "target": "hot"}]))
    argv = ["edit", "--model", str(tiny_model_dir), "--facts", str(facts), "--store", store,
            "--stream", "main", "--tokens", "300", "--epochs", "2", "--lr", "0.03"]  # fmt: skip
    assert main(argv) == 2
    assert "outside the policy of main (regression)" in capsys.readouterr().err
    assert engine.store.head(name, "main") is None
    assert [v["held"] for v in engine.store.versions(name, "main")] == [True]
    assert main([*argv, "--force"]) == 0
    assert engine.store.head(name, "main") == engine.store.versions(name, "main")[0]["id"]
