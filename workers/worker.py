"""`crispedit worker`: an RQ worker that runs jobs in its own process, model resident.

RQ's default worker forks a child per job, which would reload the model every time; the
`SimpleWorker` runs jobs in-process but only beats its heartbeat between jobs, so a long edit would
be declared dead. `ResidentWorker` keeps the model and beats from a thread while a job runs.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from rq import Queue, SimpleWorker
from rq.worker import WorkerStatus

from workers.engine import Engine
from workers.jobs import queue_name, register

HEARTBEAT_S = 10.0
log = logging.getLogger(__name__)


class ResidentWorker(SimpleWorker):
    """A SimpleWorker whose heartbeat keeps beating while a long job runs."""

    heartbeat_interval: float = HEARTBEAT_S

    def execute_job(self, job, queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # a missed beat must not kill the job; the next one may land
                    log.exception("heartbeat failed")

        beater = threading.Thread(target=beat, name="heartbeat", daemon=True)
        beater.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beater.join()
        self.set_state(WorkerStatus.IDLE)


def run_worker(
    model: str,
    store_dir: str,
    redis_url: str = "redis://127.0.0.1:6379/0",
    burst: bool = False,
    **engine_options,
) -> bool:
    """Load `model` once, then take jobs from its queue until stopped (or empty, with `burst`)."""
    print(f"loading {model} ...", flush=True)
    engine = Engine(model, store_dir, **engine_options)
    register(engine)
    connection = Redis.from_url(redis_url)
    queue = Queue(queue_name(model), connection=connection)
    worker = ResidentWorker([queue], connection=connection)
    print(f"worker {worker.name} serving {model} on queue {queue.name}", flush=True)
    return worker.work(burst=burst)
