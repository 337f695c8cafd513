"""`crispedit worker`: an RQ worker that runs jobs in its own process, model resident.

RQ's default worker forks a child per job, which would reload the model every time; the
`SimpleWorker` runs jobs in-process but only beats its heartbeat between jobs, so a long edit would
be declared dead. `ResidentWorker` keeps the model and beats from a thread while a job runs.

RQ 3 releases a finished job's dependents in two steps: a transaction moves them to the queue's
ReadyJobRegistry, then a WATCH-guarded push puts them on the queue. When two workers finish jobs
at the same moment, one push loses the WATCH race and RQ leaves that job in the registry until its
next maintenance pass (every 10 minutes), which would stall a stream. `ResidentWorker` drains the
ready registries itself, after every job and every couple of seconds while it waits.

RQ's warm shutdown raises out of the signal handler when the worker is not marked busy, and a
worker is not marked busy between popping a job and starting it: a SIGTERM that lands there leaves
the job in RQ's intermediate queue, unrun, and the stream behind it stalls until RQ's maintenance
fails the job minutes later. `ResidentWorker`'s stop only raises a flag, and its idle wait wakes
every `stop_poll_s` seconds to look at it.

RQ listens on its worker's command channel from a thread that waits up to 60 s per read, and
redis-py 8 joins that thread when the worker stops: once the unsubscribe reply lands before the
stop flag, every stop (a warm shutdown, a burst's end) took a minute more, longer than a container's
grace period. `ResidentWorker`'s listener waits `stop_poll_s` seconds at a time instead.

A worker started with `build_curvature` builds its model's curvature before it takes any job
(`warm_up`), so that a fresh deployment does not make its first edit wait for a build.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from datetime import datetime, timezone

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rq import Queue, SimpleWorker
from rq.registry import StartedJobRegistry
from rq.worker import WorkerStatus

from contract.jobs import curvature_index_key, curvature_kind, curvature_spec, queue_name
from contract.settings import DEFAULTS
from workers.engine import Engine
from workers.jobs import record_curvature, register

HEARTBEAT_S = 10.0
# A worker's Redis commands are retried through an outage this long (backoff 0.1 s doubling to
# REDIS_BACKOFF_CAP_S): a job running meanwhile goes on, and its outcome is written once Redis
# is back. Keep it under the heartbeat's TTL (3 beats) or the job is failed as abandoned.
REDIS_OUTAGE_S = 25.0
REDIS_BACKOFF_CAP_S = 2.0
READY_SWEEP_S = 2.0
STOP_POLL_S = 1
WARM_UP_PRINT_S = 30.0
log = logging.getLogger(__name__)


class ResidentWorker(SimpleWorker):
    """A SimpleWorker whose heartbeat keeps beating while a long job runs.

    Because it beats every `heartbeat_interval` seconds, a job's heartbeat can expire after three
    missed beats instead of RQ's job timeout + 60 s: a worker killed mid-job is noticed within
    half a minute, and RQ's registry cleanup then marks its job failed (never re-queued: the edit
    may have been half done, so the client decides whether to resubmit). That cleanup is run by
    every live worker between beats (`reap_abandoned`) and by the API whenever it shows a running
    job, not only by RQ's maintenance (every 10 minutes). The store is untouched:
    nothing is published before the edit completes.
    """

    heartbeat_interval: float = HEARTBEAT_S
    ready_sweep_interval: float = READY_SWEEP_S
    stop_poll_s: int = STOP_POLL_S

    def work(self, *args, **kwargs) -> bool:
        stop = threading.Event()

        def sweep() -> None:
            while not stop.wait(min(self.ready_sweep_interval, self.heartbeat_interval)):
                try:
                    self.drain_ready()
                    self.reap_abandoned()
                except Exception:  # Redis away for a moment: the next sweep retries
                    log.exception("ready-registry sweep failed")

        sweeper = threading.Thread(target=sweep, name="ready-sweep", daemon=True)
        sweeper.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            stop.set()
            sweeper.join()

    def subscribe(self) -> None:
        """RQ's subscription to this worker's command channel, read in waits of `stop_poll_s`
        seconds (RQ's are 60), so that stopping the listener never waits long."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=self.stop_poll_s,
            daemon=True,
            exception_handler=self._pubsub_exception_handler,
        )

    def request_stop(self, signum, frame) -> None:
        """Warm shutdown: finish what was taken, take nothing new (a second signal: cold).

        Only flags are set here: a signal handler must not raise between a job's pop and its start,
        and must not use Redis, whose connection pool the interrupted code may hold locked.
        """
        self._shutdown_requested_date = datetime.now(timezone.utc)
        signal.signal(signal.SIGINT, self.request_force_stop)
        signal.signal(signal.SIGTERM, self.request_force_stop)
        self.handle_warm_shutdown_request()
        self._stop_requested = True

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's dequeue, in waits of `stop_poll_s` seconds with a look at the stop flag between.

        Returns (job, queue), or None when stopped, idle for `max_idle_time` seconds, or (with no
        `timeout`: a burst) when the queues are empty.
        """
        idle_since = time.monotonic()
        while not self._stop_requested:
            wait = None if timeout is None else self.stop_poll_s
            result = super().dequeue_job_and_maintain_ttl(wait, max_idle_time=wait)
            if result is not None or timeout is None:
                return result
            if max_idle_time is not None and time.monotonic() - idle_since >= max_idle_time:
                return None
        return None

    def drain_ready(self, tries: int = 20) -> int:
        """Push the jobs left in this worker's queues' ready registries onto the queues.

        RQ's push skips a job whose registry entry changed under WATCH (another worker pushed a
        job meanwhile), so this retries, with a short random pause, until the registries are empty
        or `tries` passes ran. Returns how many jobs this call pushed.
        """
        pushed = 0
        for _ in range(tries):
            registries = [queue.ready_job_registry for queue in self.queues]
            waiting = [r for r in registries if r.get_job_count(cleanup=False)]
            if not waiting:
                break
            for registry in waiting:
                pushed += len(registry.cleanup())
            time.sleep(random.uniform(0.0, 0.05))
        return pushed

    def reap_abandoned(self) -> None:
        """Fail the jobs of this worker's queues whose worker died (heartbeat expired): RQ's
        own maintenance does it only every 10 minutes, which would leave a dead worker's job
        `running`, and its stream stalled, that long while this worker idles beside it."""
        for queue in self.queues:
            StartedJobRegistry(queue=queue).cleanup()  # what service.jobqueue.fetch does too

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return max(1, round(3 * self.heartbeat_interval))

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
        self.drain_ready()  # the successor this job released, if RQ's own push lost a race
        self.set_state(WorkerStatus.IDLE)


def run_worker(
    model: str,
    store_dir: str,
    redis_url: str = "redis://127.0.0.1:6379/0",
    burst: bool = False,
    heartbeat_s: float = HEARTBEAT_S,
    build_curvature: bool = False,
    **engine_options,
) -> bool:
    """Load `model` once, then take jobs from its queue until stopped (or empty, with `burst`).

    At start the worker forgets what its model's curvature index said (its model or corpus may
    have changed since); with `build_curvature` it then makes sure the curvature its default edit
    method needs is in the store (built, or resumed from a checkpoint, before the first job is
    taken) and records it, so a fresh deployment is warm before its first edit.
    """
    print(f"loading {model} ...", flush=True)
    engine = Engine(model, store_dir, **engine_options)
    register(engine)
    connection = worker_redis(redis_url)
    connection.delete(curvature_index_key(model))
    kind = curvature_kind(DEFAULTS.method)
    if build_curvature and kind is not None:
        warm_up(engine, connection, kind)
    queue = Queue(queue_name(model), connection=connection)
    worker = ResidentWorker([queue], connection=connection)
    worker.heartbeat_interval = heartbeat_s
    print(f"worker {worker.name} serving {model} on queue {queue.name}", flush=True)
    return worker.work(burst=burst)


def worker_redis(url: str, outage_s: float = REDIS_OUTAGE_S) -> Redis:
    """A Redis client whose every command (the worker loop's, the heartbeat's, the job's) is
    retried with exponential backoff for about `outage_s` seconds on a connection error or a
    timeout, instead of RQ ending the worker on the first one. A command retried after Redis
    answered it but before the reply arrived runs twice; RQ's writes are idempotent but for
    queue pushes, which happen when a job is enqueued, not in a worker's job."""
    waits, retries = 0.0, 0
    while waits < outage_s:
        waits += min(REDIS_BACKOFF_CAP_S, 0.1 * 2 ** (retries + 1))
        retries += 1
    retry = Retry(ExponentialBackoff(cap=REDIS_BACKOFF_CAP_S, base=0.1), retries)
    return Redis.from_url(
        url,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=2,
        socket_keepalive=True,
        health_check_interval=30,
    )


def warm_up(engine: Engine, connection: Redis, kind: str) -> str:
    """Find or build the engine's own curvature of `kind`, printing its progress now and then,
    and record it for the API; its store key."""
    last = [0.0]

    def show(info: dict) -> None:
        if (
            time.monotonic() - last[0] >= WARM_UP_PRINT_S
            or info["tokens_done"] == info["tokens_total"]
        ):
            last[0] = time.monotonic()
            print(
                f"curvature ({info['pass']}): {info['tokens_done']}/{info['tokens_total']} tokens",
                flush=True,
            )

    print(
        f"curvature ({kind}) for {engine.name}: {engine.tokens} tokens of {engine.corpus}",
        flush=True,
    )
    _, manifest = engine.build_curvature(kind, report=show)
    record_curvature(connection, engine.name, curvature_spec(kind), manifest["key"])
    state = "found in the store" if manifest["cache_hit"] else "built"
    print(f"curvature {manifest['key']} {state}", flush=True)
    return manifest["key"]
