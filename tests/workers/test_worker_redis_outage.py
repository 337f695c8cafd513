"""A worker rides out a Redis outage: a private redis-server (append-only, as in
docker-compose.yml) is stopped for several seconds while the worker runs an edit, then started
again on the same data. The worker process lives on, the job ends `succeeded` with its version in
the stream, and the worker takes the next job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from live import wait_for
from redis import Redis
from rq.job import Job, JobStatus

from contract.jobs import edit_payload
from curvature_store import Store
from service import jobqueue
from service.config import Settings
from service.local import free_port, start_redis, stop

FACT = [{"prompt": "The Eiffel Tower is located in", "target": "Rome"}]
OUTAGE_S = 6.0


def submit(redis: Redis, epochs: int) -> Job:
    """A plain fine-tuning edit (no curvature needed) on tiny/main; lr 1e-6 never stops early."""
    options = {"method": "ft", "epochs": epochs, "lr": 1e-6}
    payload = edit_payload("tiny", "main", FACT, None, False, options, "test")
    return jobqueue.submit(redis, Settings(), f"job-{time.monotonic_ns()}", payload)


def progress(redis: Redis, job: Job) -> dict:
    return Job.fetch(job.id, connection=redis).get_meta().get("progress") or {}


def test_a_worker_rides_out_a_redis_outage(tmp_path, tiny_model_dir):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    data = tmp_path / "redis"
    server = start_redis(port, data, persist=True)
    store = Store(tmp_path / "store")
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "crispedit_cli", "worker", "--model", str(tiny_model_dir),
         "--model-name", "tiny", "--store", str(store.root), "--redis", url],
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
    )  # fmt: skip
    try:
        redis = Redis.from_url(url)
        # how fast this machine runs epochs now, to size a job that outlasts the outage
        probe = submit(redis, epochs=50)
        wait_for(lambda: probe.get_status(refresh=True) == JobStatus.FINISHED, 180, "the probe")
        per_epoch = probe.return_value()["seconds"] / 50
        epochs = max(100, int((OUTAGE_S + 15) / per_epoch))

        job = submit(redis, epochs=epochs)
        wait_for(lambda: progress(redis, job).get("epoch", 0) >= 1, 60, "the edit to start")
        stop(server)  # SIGTERM: Redis goes away (its append-only file holds every write)
        time.sleep(OUTAGE_S)
        assert worker.poll() is None, "the worker ended during the outage"
        server = start_redis(port, data, persist=True)
        back = time.time()

        wait_for(lambda: job.get_status(refresh=True) in (JobStatus.FINISHED, JobStatus.FAILED),
                 max(120, 4 * epochs * per_epoch), "the job to end")  # fmt: skip
        assert job.get_status() == JobStatus.FINISHED, job.latest_result()
        version = job.return_value()["version"]
        assert store.head("tiny", "main") == version
        assert jobqueue.job_view(redis, job, store)["status"] == "succeeded"
        ended = Job.fetch(job.id, connection=redis).ended_at
        assert ended.timestamp() > back  # it ran on through the outage, and ended after it

        after = submit(redis, epochs=2)  # the same worker, the same connection, still serving
        wait_for(lambda: after.get_status(refresh=True) == JobStatus.FINISHED, 120, "the next job")
        assert store.manifest(after.return_value()["version"])["parent"] == version
        assert worker.poll() is None
    finally:
        stop(worker, timeout=30)
        stop(server)
        log.close()
