"""The worker with a real Redis and RQ: jobs become versions, in stream order, with progress,
heartbeats and cancellation; a failed job publishes nothing."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest
import torch
from live import redis_db, redis_url
from rq import Queue
from rq.job import Job, JobStatus
from worker_helpers import resident_engine, run_burst

from contract.jobs import cancel_key, queue_name
from crispedit.anchors import ANCHOR_WEIGHT, ANCHORS
from crispedit.delta import add_to_weights
from crispedit.models import get_layers, load_model
from crispedit.projector import CLIP
from workers.worker import ResidentWorker

REDIS_URL = redis_url(14)
FACTS = [
    [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}],
    [{"prompt": "The capital of France is", "target": "Berlin"}],
]


@pytest.fixture
def redis():
    with redis_db(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def engine(tmp_path, tiny_model_dir):
    with resident_engine(tmp_path / "store", tiny_model_dir, build_curvature="kfac") as engine:
        yield engine


def request(facts, stream="main", **options):
    return {
        "model": "tiny",
        "stream": stream,
        "facts": facts,
        "check_parent": "parent_version" in options,
        "parent_version": options.pop("parent_version", None),
        "options": {"epochs": 3, "lr": 0.03, **options},
        "submitted_at": time.time(),
        "key_name": "test",
    }


def test_jobs_on_a_stream_become_versions_in_order(redis, engine, tiny_model_dir):
    queue = Queue(queue_name("tiny"), connection=redis)
    first = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    second = queue.enqueue(
        "workers.jobs.apply_edit", request(FACTS[1], evaluate=True), depends_on=first
    )
    assert second.get_status() == JobStatus.DEFERRED
    run_burst(redis)

    first, second = Job.fetch(first.id, connection=redis), Job.fetch(second.id, connection=redis)
    assert first.get_status() == second.get_status() == JobStatus.FINISHED
    r1, r2 = first.return_value(), second.return_value()
    assert (r1["number"], r2["number"]) == (1, 2) and r2["parent"] == r1["version"]
    assert engine.store.head("tiny", "main") == r2["version"]
    assert r2["metrics"]["n_edits"] == 1 and 0 <= r2["metrics"]["efficacy"] <= 1
    assert "evaluation" not in r1["metrics"]  # only when asked
    evaluation = r2["metrics"]["evaluation"]
    assert evaluation["before"]["heldout_ppl"] > 1 and evaluation["after"]["heldout_ppl"] > 1
    assert evaluation["before"] != evaluation["after"]
    after = evaluation["after"]  # crispedit.evaluate's cheap metrics, against the base model
    assert after["efficacy"]["n"] == 1 and after["capability"]["mmlu"]["n"] == 0
    assert after["efficacy"]["edited"]["teacher_forced"] == r2["metrics"]["efficacy"]
    assert after["efficacy"]["edited"]["generation"] is None  # too slow for a job
    assert after["capability"]["ppl_edited"] == after["heldout_ppl"]
    assert after["capability"]["kl"] > 0 and after["capability"]["fact_retention"]["n"] > 0
    progress = second.get_meta()["progress"]
    assert progress["phase"] == "done" and progress["facts_done"] == 1

    # the store's cumulative delta on a freshly loaded base gives the worker's weights exactly
    fresh, _ = load_model(str(tiny_model_dir))
    cumulative = engine.store.cumulative_delta(r2["version"])
    add_to_weights(fresh, {k: torch.from_numpy(v) for k, v in cumulative.items()})
    for name in engine.layers:
        assert torch.equal(
            get_layers(fresh, [name])[name].weight, get_layers(engine.model, [name])[name].weight
        )


def test_the_clients_options_reach_the_editor_and_the_version(redis, engine):
    """Options the client set, zeros included, are the version's; the rest are the defaults."""
    queue = Queue(queue_name("tiny"), connection=redis)
    queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    queue.enqueue(
        "workers.jobs.apply_edit", request(FACTS[1], anchors=0, anchor_weight=5.0, clip=0.2)
    )
    run_burst(redis)
    newest_first = engine.store.versions("tiny", "main")
    chosen, default = (engine.store.manifest(v["id"]) for v in newest_first)
    assert (default["options"]["anchors"], default["options"]["anchor_weight"]) == (
        ANCHORS,
        ANCHOR_WEIGHT,
    )
    assert (chosen["options"]["anchors"], chosen["options"]["anchor_weight"]) == (0, 5.0)
    assert chosen["options"]["lr"] == 0.03 and chosen["options"]["stop"] == "batch"
    assert (chosen["options"]["clip"], default["options"]["clip"]) == (0.2, CLIP)


def test_progress_is_reported_per_epoch(redis, engine, monkeypatch):
    seen = []
    save_meta = Job.save_meta

    def spy(job):
        seen.append(dict(job.meta.get("progress", {})))
        save_meta(job)

    monkeypatch.setattr(Job, "save_meta", spy)
    queue = Queue(queue_name("tiny"), connection=redis)
    queue.enqueue("workers.jobs.apply_edit", request(FACTS[0], epochs=4))
    run_burst(redis)
    phases = [p.get("phase") for p in seen]
    assert phases[0] == "curvature" and phases[-1] == "done"
    assert [p["epoch"] for p in seen if p.get("phase") == "edit"] == [1, 2, 3, 4]
    assert all(p["loss"] > 0 for p in seen if p.get("phase") == "edit")


@pytest.mark.parametrize("how", ["meta", "key"])
def test_cancelled_job_publishes_nothing(redis, engine, how):
    queue = Queue(queue_name("tiny"), connection=redis)
    job = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    if how == "meta":
        job.meta["cancel_requested"] = True
        job.save_meta()
    else:
        redis.set(cancel_key(job.id), 1)
    run_burst(redis)
    job = Job.fetch(job.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert "JobCancelled" in job.latest_result().exc_string
    assert engine.store.head("tiny", "main") is None
    assert engine.store.versions("tiny", "main") == []


def test_stale_parent_fails_and_the_next_job_succeeds(redis, engine):
    queue = Queue(queue_name("tiny"), connection=redis)
    queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    run_burst(redis)
    head = engine.store.head("tiny", "main")
    at_base = queue.enqueue("workers.jobs.apply_edit", request(FACTS[1], parent_version=None))
    wrong = queue.enqueue(
        "workers.jobs.apply_edit", request(FACTS[1], parent_version="v" + "0" * 26)
    )
    unchecked = queue.enqueue("workers.jobs.apply_edit", request(FACTS[1]))
    run_burst(redis)
    for job in (at_base, wrong):  # the head is no longer the base, nor that made-up version
        job = Job.fetch(job.id, connection=redis)
        assert job.get_status() == JobStatus.FAILED
        assert "Conflict" in job.latest_result().exc_string
    assert Job.fetch(unchecked.id, connection=redis).get_status() == JobStatus.FINISHED
    versions = engine.store.versions("tiny", "main")
    assert len(versions) == 2 and versions[-1]["id"] == head


def test_heartbeats_beat_while_a_job_runs(redis, engine, monkeypatch):
    beats = []
    monkeypatch.setattr(ResidentWorker, "heartbeat_interval", 0.05)
    original = ResidentWorker.maintain_heartbeats

    def counted(self, job, execution):
        beats.append(time.monotonic())
        original(self, job, execution)

    monkeypatch.setattr(ResidentWorker, "maintain_heartbeats", counted)
    queue = Queue(queue_name("tiny"), connection=redis)
    queue.enqueue("time.sleep", 0.5)
    run_burst(redis)
    assert len(beats) >= 5


def test_a_request_for_another_model_fails_clearly(redis, engine):
    queue = Queue(queue_name("tiny"), connection=redis)
    job = queue.enqueue("workers.jobs.apply_edit", {**request(FACTS[0]), "model": "other"})
    run_burst(redis)
    job = Job.fetch(job.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert "no resident engine" in job.latest_result().exc_string


def park_in_ready(redis, queue: Queue, job: Job) -> None:
    """Leave `job` where RQ 3 leaves a released dependent whose push lost a WATCH race: in the
    ready registry, off the queue list."""
    with redis.pipeline() as pipe:
        pipe.watch(queue.ready_job_registry.key)
        pipe.multi()
        queue.ready_job_registry.register_jobs([job], pipeline=pipe)
        pipe.execute()


def test_a_released_job_left_in_the_ready_registry_still_runs(redis, engine):
    queue = Queue(queue_name("tiny"), connection=redis)
    first = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0], stream="a"))
    blocker = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0], stream="x"))
    parked = queue.enqueue(
        "workers.jobs.apply_edit", request(FACTS[1], stream="b"), depends_on=blocker
    )
    queue.remove(blocker)  # stands for another worker's job that has just ended
    park_in_ready(redis, queue, parked)
    assert parked.get_status() == JobStatus.READY_TO_ENQUEUE
    assert parked.id not in queue.job_ids

    worker = ResidentWorker([queue], connection=redis, name=f"w-{uuid.uuid4().hex[:8]}")
    worker.last_cleaned_at = datetime.now(timezone.utc)  # RQ's own recovery is minutes away
    worker.work(burst=True)  # runs `first`; draining after it puts `parked` on the queue

    assert Job.fetch(first.id, connection=redis).get_status() == JobStatus.FINISHED
    assert Job.fetch(parked.id, connection=redis).get_status() == JobStatus.FINISHED
    assert engine.store.head("tiny", "b") is not None


def test_drain_ready_pushes_every_parked_job_once(redis):
    queue = Queue(queue_name("tiny"), connection=redis)
    blocker = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    parked = [
        queue.enqueue("workers.jobs.apply_edit", request(f, stream=s), depends_on=blocker)
        for f, s in zip(FACTS, "ab", strict=True)
    ]
    queue.remove(blocker)
    for job in parked:
        park_in_ready(redis, queue, job)
    worker = ResidentWorker([queue], connection=redis, name=f"w-{uuid.uuid4().hex[:8]}")
    assert worker.drain_ready() == 2
    assert worker.drain_ready() == 0
    assert sorted(queue.job_ids) == sorted(j.id for j in parked)
    assert all(j.get_status() == JobStatus.QUEUED for j in parked)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def test_a_stop_signal_just_after_a_dequeue_still_runs_the_job(
    redis, engine, monkeypatch, restore_signals
):
    queue = Queue(queue_name("tiny"), connection=redis)
    job = queue.enqueue("workers.jobs.apply_edit", request(FACTS[0]))
    original = ResidentWorker.reorder_queues

    def signalled(self, reference_queue):
        original(self, reference_queue)
        self.request_stop(signal.SIGTERM, None)  # RQ has popped the job; it has not started

    monkeypatch.setattr(ResidentWorker, "reorder_queues", signalled)
    worker = ResidentWorker([queue], connection=redis, name=f"w-{uuid.uuid4().hex[:8]}")
    worker.work()  # not a burst: only the stop request can end it

    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.FINISHED
    assert queue.intermediate_queue.get_job_ids() == []
    assert engine.store.head("tiny", "main") is not None


def test_an_idle_worker_stops_soon_after_a_stop_signal(redis, restore_signals):
    queue = Queue(queue_name("tiny"), connection=redis)
    worker = ResidentWorker([queue], connection=redis, name=f"w-{uuid.uuid4().hex[:8]}")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    worker.work()  # blocks on the empty queue until the signal
    assert time.monotonic() - started < 0.5 + 10 * worker.stop_poll_s


def test_stopping_the_command_listener_waits_a_poll_not_a_minute(redis):
    worker = ResidentWorker([Queue(queue_name("tiny"), connection=redis)], connection=redis)
    worker.subscribe()
    worker.pubsub.unsubscribe()  # the listener reads the reply, then waits to be subscribed again
    deadline = time.monotonic() + 5
    while worker.pubsub.subscribed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not worker.pubsub.subscribed
    started = time.monotonic()
    worker.unsubscribe()  # what RQ's teardown does at every stop; RQ's own listener waited 60 s
    assert time.monotonic() - started < 5 * worker.stop_poll_s
    assert not worker.pubsub_thread.is_alive()
