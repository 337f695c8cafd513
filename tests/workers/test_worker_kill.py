"""A worker process killed with SIGKILL in the middle of an edit: the job ends failed (never
re-queued), the stream head and the store are untouched, and the next job succeeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

from curvature_store import Store
from workers.jobs import queue_name

REDIS_URL = "redis://127.0.0.1:6379/13"
FACT = [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}]


def request(epochs: int) -> dict:
    return {
        "model": "tiny",
        "stream": "main",
        "facts": FACT,
        "parent_version": None,
        "check_parent": False,
        "options": {"epochs": epochs, "lr": 1e-6},  # tiny lr: the loss never stops it early
        "submitted_at": time.time(),
        "key_name": "test",
    }


def start_worker(tiny_model_dir, store_dir, *extra) -> subprocess.Popen:
    argv = [sys.executable, "-m", "crispedit.cli", "worker", "--model", str(tiny_model_dir),
            "--model-name", "tiny", "--store", str(store_dir), "--redis", REDIS_URL,
            "--tokens", "300", "--heartbeat", "0.5", *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_killed_worker_leaves_job_failed_and_store_untouched(tmp_path, tiny_model_dir):
    redis = Redis.from_url(REDIS_URL)
    redis.flushdb()
    store_dir = tmp_path / "store"
    queue = Queue(queue_name("tiny"), connection=redis)
    job = queue.enqueue("workers.jobs.apply_edit", request(epochs=100_000), job_timeout=600)
    worker = start_worker(tiny_model_dir, store_dir)
    try:
        wait_for(
            lambda: (
                (Job.fetch(job.id, connection=redis).get_meta().get("progress") or {}).get("phase")
                == "edit"
            ),
            60,
            "the edit to start",
        )
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()

    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.STARTED  # not yet noticed
    time.sleep(2.5)  # three missed beats of 0.5 s, rounded up
    StartedJobRegistry(queue=queue).cleanup()
    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.FAILED
    assert queue.count == 0  # not re-queued

    store = Store(store_dir)
    assert store.head("tiny", "main") is None
    assert store.versions("tiny", "main") == []
    assert store.verify() == []

    nxt = queue.enqueue("workers.jobs.apply_edit", request(epochs=2))
    again = start_worker(tiny_model_dir, store_dir, "--burst")
    assert again.wait(timeout=120) == 0
    nxt = Job.fetch(nxt.id, connection=redis)
    assert nxt.get_status() == JobStatus.FINISHED
    assert store.head("tiny", "main") == nxt.return_value()["version"]
    redis.flushdb()
