"""A worker process killed with SIGKILL at each phase of a job: while an edit reads the stored
curvature, while a curvature job stores what it built, in the optimisation, and at each step of
the version write. The job ends failed (never re-queued), the stream head is the previous version
(or, killed after the commit point, the new one, which the API then reports as the job's result),
the store verifies clean, and the next job on the stream succeeds; the killed curvature build is
resumed from its checkpoint by the next job that asks for it.

The kills at a store step use the store's own failpoints (`CURVATURE_STORE_FAILPOINT`: the process
SIGKILLs itself at that line); the kill in the optimisation is a real `kill -9` from outside once
the job reports its first epoch.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from live import redis_url, wait_for
from redis import Redis
from rq import Queue, Worker
from rq.job import Job, JobStatus
from worker_helpers import resident_engine, run_burst

from contract.jobs import curvature_payload, edit_payload, queue_name
from curvature_store import Store
from service import jobqueue
from service.config import Settings

REDIS_URL = redis_url(13)
FACT = [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}]
HEARTBEAT_S = 0.5
# the heartbeat's TTL (three beats, whole seconds: 2 s) and a sweep of a live worker (one beat),
# with a second for a loaded machine: docs/operations.md's bound (30 s for 10 s beats) at this scale
NOTICED_S = 2 + HEARTBEAT_S + 1.0


def failed(job: Job | None) -> bool:
    return job is not None and job.get_status(refresh=False) == JobStatus.FAILED


def submit(redis: Redis, epochs: int) -> Job:
    """An edit job on stream tiny/main, enqueued as the API does."""
    payload = edit_payload(
        "tiny", "main", FACT, None, False, {"epochs": epochs, "lr": 1e-6}, "test"
    )  # lr 1e-6: the loss never stops the edit early
    return jobqueue.submit(redis, Settings(), f"job-{time.monotonic_ns()}", payload)


def submit_curvature(redis: Redis, tokens: int) -> Job:
    """A curvature job for model tiny with a budget of `tokens`, enqueued as the API does."""
    payload = curvature_payload("tiny", "kfac", tokens, None, "test")
    return jobqueue.submit_curvature(redis, Settings(), payload)[0]


def start_worker(tiny_model_dir, store_dir, *extra, failpoint=None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "crispedit_cli", "worker", "--model", str(tiny_model_dir),
            "--model-name", "tiny", "--store", str(store_dir), "--redis", REDIS_URL,
            "--heartbeat", str(HEARTBEAT_S), *extra]  # fmt: skip
    if "--tokens" not in extra:
        argv += ["--tokens", "300"]
    env = {**os.environ, "CURVATURE_STORE_FAILPOINT": failpoint or ""}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def phase(redis: Redis, job: Job) -> str | None:
    return (Job.fetch(job.id, connection=redis).get_meta().get("progress") or {}).get("phase")


@pytest.fixture(scope="module")
def prepared_store(tmp_path_factory, tiny_model_dir):
    """A store with the tiny model's curvature and one version on tiny/main, made by a worker
    that built the curvature when it started."""
    store_dir = tmp_path_factory.mktemp("kill") / "store"
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    job = submit(redis, epochs=2)
    worker = start_worker(tiny_model_dir, store_dir, "--burst", "--build-curvature")
    assert worker.wait(timeout=120) == 0
    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.FINISHED
    redis.flushdb()
    return store_dir


# (where the worker dies, whether the version was committed by then)
KILLS = {
    "curvature:read": False,  # an edit loading the stored curvature
    "curvature:staged": False,  # a curvature job of another budget: built, dies storing it
    "edit": False,  # kill -9 from outside during the optimisation
    "create:staged": False,  # version folder assembled under tmp/
    "create:published": False,  # version folder in place, head not moved
    "create:head_moved": True,  # after the commit point, before RQ has the result
}


@pytest.mark.parametrize("where", list(KILLS))
def test_worker_killed_mid_job_loses_and_duplicates_nothing(
    where, prepared_store, tmp_path, tiny_model_dir
):
    committed = KILLS[where]
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    store_dir = tmp_path / "store"
    shutil.copytree(prepared_store, store_dir)
    store = Store(store_dir)
    previous = store.head("tiny", "main")
    assert previous is not None

    if where == "curvature:staged":
        job = submit_curvature(redis, tokens=200)
    else:
        job = submit(redis, epochs=2 if where.startswith("create") else 100_000)
    failpoint = None if where == "edit" else where
    worker = start_worker(tiny_model_dir, store_dir, failpoint=failpoint)
    try:
        if where == "edit":
            wait_for(lambda: phase(redis, job) == "edit", 60, "the edit to start")
            os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=60) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
    assert phase(redis, job) == ("curvature" if where.startswith("curvature") else "edit")

    queue = Queue(queue_name("tiny"), connection=redis)
    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.STARTED  # not noticed yet
    # no worker is left: the API notices, when it shows the job, once the heartbeat has expired
    wait_for(lambda: failed(jobqueue.fetch(redis, job.id)), NOTICED_S, "the API to notice")
    job = Job.fetch(job.id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert queue.count == 0  # not re-queued

    assert store.verify() == []
    view = jobqueue.job_view(redis, job, store)
    if committed:  # the edit is in the stream: the API reports it, so nobody applies it twice
        head = store.head("tiny", "main")
        assert store.manifest(head)["parent"] == previous
        assert store.manifest(head)["job"] == job.id
        assert view["status"] == "succeeded"
        assert view["version"] == head and view["result"]["recovered"] is True
    else:
        assert store.head("tiny", "main") == previous
        assert len(store.versions("tiny", "main")) == 1
        assert view["status"] == "failed" and view["version"] is None

    # the next jobs run on a resident worker in this process: the same worker code as
    # `crispedit worker` (the kill above and `prepared_store` run that), without a process start
    head = store.head("tiny", "main")
    nxt = submit(redis, epochs=2)
    with resident_engine(store_dir, tiny_model_dir):
        run_burst(redis)
    nxt = Job.fetch(nxt.id, connection=redis)
    assert nxt.get_status() == JobStatus.FINISHED
    assert store.head("tiny", "main") == nxt.return_value()["version"]
    assert store.manifest(nxt.return_value()["version"])["parent"] == head
    assert store.verify() == []
    if where == "curvature:staged":  # the build is not lost: the next one resumes it
        again = submit_curvature(redis, tokens=200)
        with resident_engine(store_dir, tiny_model_dir):
            run_burst(redis)
        result = Job.fetch(again.id, connection=redis).return_value()
        assert result["cache_hit"] is False and result["resumed_from"] is not None
        assert store.curvature_file(result["key"]).is_file()
    redis.flushdb()


def test_a_live_worker_notices_its_dead_neighbour_without_help(
    prepared_store, tmp_path, tiny_model_dir
):
    """Two workers on one queue; the one running a job is killed. Nobody calls RQ's cleanup and
    nobody asks the API: the surviving worker fails the job within the heartbeat's TTL and a
    sweep, and then runs the stream's next job, which waited behind it."""
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    store_dir = tmp_path / "store"
    shutil.copytree(prepared_store, store_dir)
    queue = Queue(queue_name("tiny"), connection=redis)
    workers = [start_worker(tiny_model_dir, store_dir) for _ in range(2)]
    try:
        wait_for(lambda: len(Worker.all(queue=queue)) == 2, 120, "two workers")
        long = submit(redis, epochs=100_000)
        after = submit(redis, epochs=2)  # the same stream: waits for `long`
        wait_for(lambda: phase(redis, long) == "edit", 60, "the edit to start")
        name = Job.fetch(long.id, connection=redis).worker_name
        pid = int(redis.hget(f"rq:worker:{name}", "pid"))
        victim = next(w for w in workers if w.pid == pid)
        os.kill(pid, signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
        killed = time.monotonic()

        def status(job: Job) -> str:  # as stored: no cleanup on the way
            return redis.hget(Job.key_for(job.id), "status").decode()

        wait_for(lambda: status(long) == JobStatus.FAILED, NOTICED_S, "the live worker to notice")
        assert time.monotonic() - killed <= NOTICED_S
        wait_for(lambda: status(after) == JobStatus.FINISHED, 120, "the next job to run")
        assert queue.count == 0  # the dead worker's job was not re-queued
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(timeout=30)
