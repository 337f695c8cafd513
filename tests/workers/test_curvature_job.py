"""Curvature jobs on a real worker with the real engine (tiny model), Redis and RQ: the build
reports its progress and is recorded for the API, an edit waits for the build it needs and fails
clearly when there is none, and a worker started with `build_curvature` is warm before its first
job."""

from __future__ import annotations

import uuid

import pytest
from live import redis_db, redis_url
from rq.job import Job, JobStatus
from worker_helpers import resident_engine, run_burst

from contract.jobs import (
    curvature_index_key,
    curvature_payload,
    curvature_spec,
    edit_payload,
)
from crispedit.curvature import Curvature
from curvature_store import Store
from service import jobqueue
from service.config import Settings
from workers import jobs
from workers.worker import run_worker

REDIS_URL = redis_url(9)
FACT = [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}]
SETTINGS = Settings(redis_url=REDIS_URL)


@pytest.fixture
def redis():
    with redis_db(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def engine(tmp_path, tiny_model_dir):
    """A resident engine with nothing built yet (a fresh store)."""
    with resident_engine(tmp_path / "store", tiny_model_dir) as engine:
        yield engine


def submit_edit(redis, engine, method: str = "kfac") -> Job:
    """An edit enqueued as POST /v1/edits does: after the curvature build it needs."""
    payload = edit_payload("tiny", "main", FACT, None, False, {"epochs": 2, "method": method}, "t")
    build = jobqueue.curvature_for_edit(redis, SETTINGS, engine.store, "tiny", method, "t")
    return jobqueue.submit(redis, SETTINGS, uuid.uuid4().hex, payload, curvature_job=build)


def test_a_curvature_job_builds_reports_and_records(redis, engine):
    payload = curvature_payload("tiny", "ekfac", 400, "wikitext", "t")
    job, new = jobqueue.submit_curvature(redis, SETTINGS, payload)
    assert new and job.timeout == SETTINGS.curvature_timeout_s
    assert engine.store.list_curvature() == []
    run_burst(redis)

    job = Job.fetch(job.id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED
    result = job.return_value()
    assert (result["kind"], result["tokens"], result["cache_hit"]) == ("ekfac", 400, False)
    stored = Curvature.load(engine.store.curvature_file(result["key"]))
    assert stored.kind == "ekfac" and stored.meta["key"]["tokens"] == 400
    progress = job.get_meta()["progress"]
    assert progress["pass"] == "EK-FAC" and progress["tokens_done"] == progress["tokens_total"]
    assert progress["tokens_total"] == 2 * 400  # two passes over the budget
    spec = curvature_spec("ekfac", 400, "wikitext")
    assert redis.hget(curvature_index_key("tiny"), spec).decode() == result["key"]
    # not the worker's own budget: nothing of it is kept resident for edits
    assert "ekfac" not in engine._curvature
    assert jobqueue.built_curvature(redis, engine.store, "tiny", spec) == result["key"]


def test_an_edit_waits_for_its_build_then_runs_with_it(redis, engine):
    edit = submit_edit(redis, engine)
    build = edit.meta["curvature_job"]
    assert build is not None and edit.get_status() == JobStatus.DEFERRED
    run_burst(redis)
    build, edit = Job.fetch(build, connection=redis), Job.fetch(edit.id, connection=redis)
    assert build.get_status() == edit.get_status() == JobStatus.FINISHED
    assert build.ended_at <= edit.started_at
    key = build.return_value()["key"]
    manifest = engine.store.manifest(edit.return_value()["version"])
    assert manifest["curvature_key"] == key  # the edit projected with the curvature just built
    assert submit_edit(redis, engine).meta["curvature_job"] is None  # built: no wait now


def test_an_edit_without_its_curvature_fails_clearly_and_builds_nothing(redis, engine):
    edit = submit_edit(redis, engine)
    build = Job.fetch(edit.meta["curvature_job"], connection=redis)
    assert jobqueue.cancel(redis, build) is True  # taken out of the queue: never runs
    run_burst(redis)
    edit = Job.fetch(edit.id, connection=redis)
    assert edit.get_status() == JobStatus.FAILED
    error = jobqueue.job_view(redis, edit)["error"]
    assert error.startswith("CurvatureMissing: model 'tiny' has no kfac curvature yet")
    assert f"the curvature job {build.id} did not build it" in error
    assert engine.store.list_curvature() == [] and engine.store.head("tiny", "main") is None
    # plain fine-tuning needs no curvature and does not wait
    ft = submit_edit(redis, engine, method="ft")
    assert ft.meta["curvature_job"] is None
    run_burst(redis)
    assert Job.fetch(ft.id, connection=redis).get_status() == JobStatus.FINISHED


def test_a_worker_started_to_build_curvature_is_warm_before_its_first_job(
    redis, tmp_path, tiny_model_dir
):
    """An edit enqueued without any curvature job (a fresh deployment) succeeds on a worker
    started with build_curvature: it built the curvature before taking the job. The record of a
    model served before is dropped, the new one written."""
    store = tmp_path / "store"
    spec = curvature_spec("kfac")
    redis.hset(curvature_index_key("tiny"), spec, "0" * 32)
    redis.hset(curvature_index_key("tiny"), curvature_spec("ekfac"), "1" * 32)
    payload = edit_payload("tiny", "main", FACT, None, False, {"epochs": 2}, "t")
    edit = jobqueue.submit(redis, SETTINGS, uuid.uuid4().hex, payload)
    try:
        run_worker("tiny", str(store), REDIS_URL, burst=True, build_curvature=True,
                   model_path=str(tiny_model_dir), tokens=300)  # fmt: skip
    finally:
        jobs._ENGINES.pop("tiny", None)
    edit = Job.fetch(edit.id, connection=redis)
    assert edit.get_status() == JobStatus.FINISHED
    recorded = redis.hgetall(curvature_index_key("tiny"))
    assert list(recorded) == [spec.encode()]
    key = recorded[spec.encode()].decode()
    assert Store(store).manifest(edit.return_value()["version"])["curvature_key"] == key
