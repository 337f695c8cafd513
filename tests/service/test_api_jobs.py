"""Jobs: status through a real RQ worker, errors, cancel, and server-sent events over real HTTP."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack

import httpx
from api_helpers import AUTH, AUTH_TINY, edit_body, job_count, run_worker
from live import serve, wait_for
from rq import Queue

from contract.jobs import queue_name
from service.main import create_app


def test_status_from_queued_to_succeeded(client, redis, store):
    job_id = client.post("/v1/edits", json=edit_body(2), headers=AUTH).json()["job_id"]
    queued = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert (queued["status"], queued["rq_status"], queued["position"]) == ("queued", "queued", 0)
    assert queued["timings"]["submitted_at"] and queued["timings"]["started_at"] is None
    assert queued["version"] is None and queued["error"] is None

    run_worker(redis)
    done = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert done["status"] == "succeeded"
    assert done["version"] == store.head("tiny", "main")
    assert done["metrics"] == {"n_edits": 2, "efficacy": 1.0}
    assert done["progress"] == {"phase": "done", "epoch": 1, "loss": 0.01, "facts_done": 2}
    timings = done["timings"]
    assert timings["enqueued_at"] <= timings["started_at"] <= timings["ended_at"]
    assert timings["ended_at"].endswith("Z")
    assert done["position"] is None


def test_failed_job_shows_the_last_line_of_its_error(client, redis, settings):
    settings.job_function = "jobs_for_tests.fail_edit"
    job_id = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    run_worker(redis)
    failed = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert failed["status"] == "failed"
    assert failed["error"] == "ValueError: the edit diverged: loss is nan at epoch 3"
    assert failed["version"] is None


def test_failed_job_whose_version_was_committed_shows_as_recovered(client, redis, settings, store):
    settings.job_function = "jobs_for_tests.commit_then_fail"
    job_id = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    settings.job_function = "jobs_for_tests.fail_edit"
    other = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    run_worker(redis)
    head = store.head("tiny", "main")
    assert store.manifest(head)["job"] == job_id
    recovered = client.get(f"/v1/jobs/{job_id}", headers=AUTH).json()
    assert (recovered["status"], recovered["version"], recovered["error"]) == (
        "succeeded",
        head,
        None,
    )
    assert recovered["result"]["recovered"] is True
    assert recovered["metrics"] == {"efficacy": 1.0}
    # a failed job after it, on the same stream: the committed version is not its own
    failed = client.get(f"/v1/jobs/{other}", headers=AUTH).json()
    assert (failed["status"], failed["version"]) == ("failed", None)


def test_unknown_and_foreign_jobs_are_404(client, redis):
    assert client.get("/v1/jobs/nosuchjob", headers=AUTH).status_code == 404
    bad = client.get("/v1/jobs/bad$id", headers=AUTH)
    assert (bad.status_code, bad.json()["error"]["field"]) == (400, "job_id")
    other = client.post("/v1/edits", json=edit_body(model="other"), headers=AUTH).json()
    # a key restricted to "tiny" cannot see (or probe) a job of "other"
    assert client.get(other["url"], headers=AUTH_TINY).status_code == 404
    assert client.post(other["url"] + "/cancel", headers=AUTH_TINY).status_code == 404
    assert client.get(other["url"], headers=AUTH).status_code == 200


def test_cancel_a_queued_job(client, redis, store):
    job_id = client.post("/v1/edits", json=edit_body(), headers=AUTH).json()["job_id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert Queue(queue_name("tiny"), connection=redis).count == 0

    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_ended"
    run_worker(redis)
    assert store.head("tiny", "main") is None  # nothing ran, nothing published


def test_cancelling_the_first_job_releases_the_next(client, redis, store):
    first, second = (
        client.post("/v1/edits", json=edit_body(n), headers=AUTH).json()["job_id"] for n in (1, 2)
    )
    assert client.post(f"/v1/jobs/{first}/cancel", headers=AUTH).status_code == 200
    view = client.get(f"/v1/jobs/{second}", headers=AUTH).json()
    assert (view["status"], view["rq_status"], view["position"]) == ("queued", "queued", 0)
    run_worker(redis)
    assert client.get(f"/v1/jobs/{second}", headers=AUTH).json()["status"] == "succeeded"
    assert [doc["metrics"]["n_edits"] for doc in store.lineage("tiny", "main")] == [2]


def test_cancelling_a_waiting_job_keeps_the_stream_order(client, redis, store):
    first, second, third = (
        client.post("/v1/edits", json=edit_body(n), headers=AUTH).json()["job_id"]
        for n in (1, 2, 3)
    )
    requested = client.post(f"/v1/jobs/{second}/cancel", headers=AUTH)
    # deferred behind `first`: flagged for the worker, which ends it without publishing
    assert requested.status_code == 202
    assert requested.json()["cancel_requested"] is True
    assert requested.json()["status"] == "queued"
    run_worker(redis)
    statuses = [client.get(f"/v1/jobs/{i}", headers=AUTH).json()["status"] for i in (first, second)]
    assert statuses == ["succeeded", "cancelled"]
    assert client.get(f"/v1/jobs/{third}", headers=AUTH).json()["status"] == "succeeded"
    assert [doc["metrics"]["n_edits"] for doc in store.lineage("tiny", "main")] == [3, 1]


def test_events_stream_until_the_job_ends(live_server, redis, settings):
    """End to end over real HTTP: submit, follow the SSE stream while a worker runs the job."""
    with httpx.Client(base_url=live_server, headers=AUTH, timeout=10) as http:
        job = http.post("/v1/edits", json=edit_body()).json()
        events: list[tuple[str, dict]] = []
        opened = threading.Event()

        def follow():
            with http.stream("GET", job["url"] + "/events") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                event = None
                for line in response.iter_lines():
                    opened.set()
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        events.append((event, json.loads(line.removeprefix("data: "))))

        reader = threading.Thread(target=follow)
        reader.start()
        assert opened.wait(5)
        run_worker(redis)
        reader.join(timeout=10)
        assert not reader.is_alive(), "the event stream did not end"

        kinds = [kind for kind, _ in events]
        assert kinds[0] == "status" and events[0][1]["status"] == "queued"
        assert kinds[-1] == "end" and events[-1][1] == {"status": "succeeded"}
        assert events[-2][1]["status"] == "succeeded" and events[-2][1]["version"]

        # a job that has ended: one status event, then the end
        replay = http.get(job["url"] + "/events")
        assert replay.text.count("event: status") == 1 and "event: end" in replay.text
        assert http.get("/v1/jobs/nosuch/events").status_code == 404
    assert job_count(redis) == 1


def test_open_event_streams_are_capped_per_key_and_in_all(settings, redis):
    """Real HTTP: streams held open on a queued job; the cap per key answers 429, the cap of the
    process 503, and a stream the client closes gives its slot back."""
    capped = settings.model_copy(update={"sse_max_per_key": 2, "sse_max_total": 3})
    with serve(create_app(capped)) as url, ExitStack() as held:
        http = held.enter_context(httpx.Client(base_url=url, timeout=10))
        events = http.post("/v1/edits", json=edit_body(), headers=AUTH).json()["url"] + "/events"
        # another team's key follows its own job (it may not see the first)
        tiny = edit_body(stream="tiny-own")
        tiny_events = http.post("/v1/edits", json=tiny, headers=AUTH_TINY).json()["url"] + "/events"
        readers = []

        def status_of_a_new_stream(auth: dict, keep: bool = True) -> int:
            client = held.enter_context(httpx.Client(base_url=url, timeout=10))
            path = tiny_events if auth is AUTH_TINY else events
            with ExitStack() as stream:
                response = stream.enter_context(client.stream("GET", path, headers=auth))
                if response.status_code == 200:
                    lines = response.iter_lines()  # kept: dropping it would close the response
                    next(lines)  # open, and counted
                    readers.append(lines)
                    if keep:
                        held.push(stream.pop_all())
                else:
                    response.read()
                    assert response.json()["error"]["code"] == "too_many_streams"
                    assert response.headers["retry-after"]
                return response.status_code

        assert status_of_a_new_stream(AUTH) == status_of_a_new_stream(AUTH) == 200
        assert status_of_a_new_stream(AUTH) == 429  # this key's cap
        assert status_of_a_new_stream(AUTH_TINY) == 200  # another key: its own count
        assert status_of_a_new_stream(AUTH_TINY) == 503  # the process's cap
        assert http.get(events.removesuffix("/events"), headers=AUTH).status_code == 200

        # a stream the client closes: the server notices at its next poll, the slot comes back
        assert status_of_a_new_stream(AUTH_TINY, keep=False) == 503
        held.close()
        with httpx.Client(base_url=url, timeout=10) as again:
            wait_for(
                lambda: again.get(events.removesuffix("/events"), headers=AUTH).is_success
                and _opens(again, events), 5, "the slots to come back",
            )  # fmt: skip


def _opens(client: httpx.Client, events: str) -> bool:
    """Whether a new event stream opens (and close it at once)."""
    with client.stream("GET", events, headers=AUTH) as response:
        return response.status_code == 200
