"""Edit and curvature jobs on RQ: submission in stream order, status, cancel.

The job contract with the worker (queue and key names, the payload, the result, cancellation)
is written once in `contract.jobs`; this module is the API's side of it. The job function is
`Settings.job_function` (default `contract.jobs.JOB_FUNCTION`), with RQ's default (pickle)
serializer. job.meta written by the API at submission: `model`, `stream`, `key_name`, `actor`
(team and key id), `owner` (the stream's team), `submitted_at`, `n_facts`, `after` (the
stream's previous job id, or None); the worker writes
`meta["progress"]` (shown as is). A cancelled job ends without publishing, by raising (the job
fails; shown as `cancelled`) or returning `{"cancelled": True}`. An edit on a guarded stream
whose version is outside the stream's policy returns `{"rejected": True, ...}`: shown as
`rejected` (its version kept, the head unmoved). A generate job (`submit_generate`) has
`job_type: "generate"` and the `version` it answers as.

Ordering: every job of a (model, stream) depends on the stream's previous job while that one has
not ended (`Dependency(allow_failure=True)`: a failed edit does not block the next one), so the
jobs of one stream run one after another in submission order, whichever worker takes them. The
previous job id is kept under `contract.jobs.last_key`, read and replaced under a Redis lock
(`lock_key`) so that concurrent submissions form one chain.

Curvature (`submit_curvature`): one job per curvature spec at a time; a request for a spec whose
job is queued or running gets that job. Its meta has `job_type: "curvature"`, `kind`, `tokens`
and `corpus`. An edit whose method needs a curvature that no worker has recorded as built
(`built_curvature`) also depends on the curvature job (`curvature_for_edit`; meta
`curvature_job`), so it waits for the build instead of running without it.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

from redis import Redis
from redis.exceptions import LockError, RedisError
from rq import Queue
from rq.job import Dependency, Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.results import Result

from contract.jobs import (
    GENERATE_FUNCTION,
    CheckpointPayload,
    CurvaturePayload,
    EditPayload,
    GeneratePayload,
    cancel_key,
    checkpoint_jobs_key,
    curvature_index_key,
    curvature_jobs_key,
    curvature_kind,
    curvature_lock_key,
    curvature_payload,
    curvature_spec,
    last_key,
    lock_key,
    now_iso,
    queue_name,
)
from curvature_store import Store, StoreError
from service.config import Settings
from service.errors import ApiError, scrub

RQ_TERMINAL = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED}
TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # RQ stores UTC; older versions as naive datetimes
        moment = moment.replace(tzinfo=timezone.utc)
    text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def submit(
    redis: Redis,
    settings: Settings,
    job_id: str,
    payload: EditPayload,
    curvature_job: str | None = None,
    owner: str | None = None,
) -> Job:
    """Enqueue the edit job `job_id` after the stream's previous unfinished job and, when given,
    the curvature job it needs (`curvature_for_edit`); the Job. `owner`, the stream's team, is
    kept in the meta: who may see the job is decided by it (`service.access`).

    Raises ApiError 503 when the stream's submission lock cannot be taken in time.
    """
    model, stream = payload["model"], payload["stream"]
    queue = Queue(queue_name(model), connection=redis)
    try:
        # The lock makes read-previous / enqueue / write-last one step for concurrent submitters
        # (in any API process); it expires by itself if a process dies holding it.
        # sleep: redis-py polls a taken lock every 0.1 s by default, which alone would put 100 ms
        # on a submission that meets another one of its stream; held for ~1 ms, poll it often
        with redis.lock(lock_key(model, stream), timeout=30, sleep=0.002, blocking_timeout=10):
            previous = redis.get(last_key(model, stream))
            previous_id = previous.decode() if previous else None
            # allow_failure: a failed edit does not block the next one, and an edit whose
            # curvature build failed runs to fail with a clear error instead of waiting forever
            waits = [j for j in (previous_id, curvature_job) if j and _unfinished(redis, j)]
            depends_on = Dependency(jobs=waits, allow_failure=True) if waits else None
            job = queue.enqueue_call(
                func=settings.job_function,
                args=(payload,),
                job_id=job_id,
                timeout=settings.job_timeout_s,
                result_ttl=settings.result_ttl_s,
                failure_ttl=settings.failure_ttl_s,
                depends_on=depends_on,
                description=f"edit {model}/{stream}: {len(payload['facts'])} facts",
                meta={
                    "model": model,
                    "stream": stream,
                    "key_name": payload["key_name"],
                    "actor": payload.get("actor"),
                    "owner": owner,
                    "submitted_at": payload["submitted_at"],
                    "n_facts": len(payload["facts"]),
                    "after": previous_id,
                    "curvature_job": curvature_job,
                },
            )
            redis.set(last_key(model, stream), job.id, ex=settings.result_ttl_s)
    except LockError:
        raise ApiError(
            503, "unavailable", f"stream {model}/{stream} is busy; retry the request"
        ) from None
    return job


def submit_generate(redis: Redis, settings: Settings, payload: GeneratePayload, scope: dict) -> Job:
    """Enqueue a generate job (`contract.jobs.GENERATE_FUNCTION`) on the model's queue, with
    the edit job timeout; it waits for no stream (a version never changes). Its meta has
    `job_type: "generate"`, `version`, and `scope` (the version's `stream` and its `owner`, and
    the `actor`), which decide who may see the job, as for an edit of that stream."""
    model = payload["model"]
    return Queue(queue_name(model), connection=redis).enqueue_call(
        func=GENERATE_FUNCTION,
        args=(payload,),
        job_id=uuid.uuid4().hex,
        timeout=settings.job_timeout_s,
        result_ttl=settings.result_ttl_s,
        failure_ttl=settings.failure_ttl_s,
        description=f"generate {model}: {len(payload['prompts'])} prompts at {payload['version']}",
        meta={
            "model": model,
            "job_type": "generate",
            "version": payload["version"],
            **scope,
            "key_name": payload["key_name"],
            "submitted_at": payload["submitted_at"],
        },
    )


def built_curvature(redis: Redis, store: Store, model: str, spec: str) -> str | None:
    """The store key of curvature `spec` of `model`, when a worker recorded it as built and the
    store still holds it; else None."""
    key = redis.hget(curvature_index_key(model), spec)
    if key is None:
        return None
    try:
        store.curvature_file(key.decode(), verify=False)
    except StoreError:  # removed from the store since, or a bad record: not built
        return None
    return key.decode()


def _one_job_per(
    redis: Redis,
    settings: Settings,
    payload: CurvaturePayload | CheckpointPayload,
    jobs_key: str,
    field: str,
    busy: str,
    *,
    func: str,
    timeout: int,
    description: str,
    meta: dict,
) -> tuple[Job, bool]:
    """The job recorded under `field` of the hash `jobs_key` while it is queued or running (and
    False), else a new job of `func` for `payload` on the model's queue, recorded there (and True).

    The model's curvature lock makes look-up / enqueue / record one step for concurrent
    submitters, so that one `field` never has two unfinished jobs. Raises ApiError 503 ("`busy`;
    retry the request") when the lock cannot be taken in time.
    """
    model = payload["model"]
    try:
        with redis.lock(curvature_lock_key(model), timeout=30, sleep=0.002, blocking_timeout=10):
            previous = redis.hget(jobs_key, field)
            if previous is not None and _unfinished(redis, previous.decode()):
                job = fetch(redis, previous.decode())
                if job is not None:
                    return job, False
            job = Queue(queue_name(model), connection=redis).enqueue_call(
                func=func,
                args=(payload,),
                job_id=uuid.uuid4().hex,
                timeout=timeout,
                result_ttl=settings.result_ttl_s,
                failure_ttl=settings.failure_ttl_s,
                description=description,
                meta=meta,
            )
            redis.hset(jobs_key, field, job.id)
    except LockError:
        raise ApiError(503, "unavailable", f"{busy}; retry the request") from None
    return job, True


def submit_curvature(
    redis: Redis, settings: Settings, payload: CurvaturePayload
) -> tuple[Job, bool]:
    """The job building the curvature of `payload`: the one of the same spec that is queued or
    running (and False), or a new one on the model's queue (and True), with the curvature job
    timeout. Raises ApiError 503 when the model's curvature lock cannot be taken in time."""
    model = payload["model"]
    return _one_job_per(
        redis,
        settings,
        payload,
        curvature_jobs_key(model),
        curvature_spec(payload["kind"], payload["tokens"], payload["corpus"]),
        f"the curvature of {model} is busy",
        func=settings.curvature_function,
        timeout=settings.curvature_timeout_s,
        description=f"curvature {model}: {payload['kind']}",
        meta={
            "model": model,
            "job_type": "curvature",
            **{k: payload[k] for k in ("kind", "tokens", "corpus", "key_name")},
            "actor": payload.get("actor"),
            "submitted_at": payload["submitted_at"],
        },
    )


def submit_checkpoint(
    redis: Redis, settings: Settings, payload: CheckpointPayload, scope: dict
) -> Job:
    """The job writing the checkpoint of `payload`'s version: the one queued or running for it,
    or a new one on the model's queue (meta `job_type: "checkpoint"`, `version`, and `scope`: the
    version's `stream`, its `owner` and the `actor`, as `submit_generate`). Raises ApiError 503
    when the model's lock cannot be taken in time."""
    model, version = payload["model"], payload["version"]
    job, _ = _one_job_per(
        redis,
        settings,
        payload,
        checkpoint_jobs_key(model),
        version,
        f"the queue of {model} is busy",
        func=settings.checkpoint_function,
        timeout=settings.checkpoint_timeout_s,
        description=f"checkpoint {model}: {version}",
        meta={
            "model": model,
            "job_type": "checkpoint",
            "version": version,
            **scope,
            "key_name": payload["key_name"],
            "submitted_at": payload["submitted_at"],
        },
    )
    return job


def curvature_for_edit(
    redis: Redis,
    settings: Settings,
    store: Store,
    model: str,
    method: str,
    key_name: str,
    actor: dict | None = None,
    laplace: float = 0.0,
    consolidate: float = 0.0,
) -> str | None:
    """The id of the curvature job an edit with `method` (and Laplace weight `laplace`,
    consolidation weight `consolidate`) must wait for: None when it needs none or a worker has
    built it, else the running build or a new one."""
    kind = curvature_kind(method, laplace, consolidate)
    if kind is None or built_curvature(redis, store, model, curvature_spec(kind)) is not None:
        return None
    payload = curvature_payload(model, kind, None, None, key_name, actor)
    job, _ = submit_curvature(redis, settings, payload)
    return job.id


def curvature_building(redis: Redis, model: str) -> bool:
    """Whether a curvature job of `model` is queued or running."""
    return any(_unfinished(redis, j.decode()) for j in redis.hvals(curvature_jobs_key(model)))


def recorded_curvature(redis: Redis, model: str) -> set[str]:
    """The store keys the workers recorded as built for `model`."""
    return {key.decode() for key in redis.hvals(curvature_index_key(model))}


def _unfinished(redis: Redis, job_id: str) -> bool:
    """Whether job `job_id` exists and has not ended (so a successor must wait for it)."""
    status = redis.hget(Job.key_for(job_id), "status")
    return status is not None and status.decode() not in RQ_TERMINAL


def fetch(redis: Redis, job_id: str) -> Job | None:
    """One of our edit jobs, or None (unknown, expired, or not created by this API).

    A job still running is first checked against its queue's started registry
    (`reap_abandoned`), so a job whose worker died shows as failed once its heartbeat has
    expired, whether or not any worker is left to notice."""
    try:
        job = Job.fetch(job_id, connection=redis)
    except RedisError:  # Redis is down: a 503, never "no such job"
        raise
    except Exception:  # NoSuchJobError, or a job whose data no longer deserializes
        return None
    if not isinstance(job.meta.get("model"), str):
        return None
    if job.get_status(refresh=False) == JobStatus.STARTED and reap_abandoned(redis, job.origin):
        job.refresh()
    return job


def reap_abandoned(redis: Redis, queue_name: str) -> bool:
    """Fail the jobs of `queue_name` whose worker's heartbeat has expired (RQ's started-registry
    cleanup: marked failed, never re-queued, their stream's next job released); whether there
    were any. RQ's own workers do this only every 10 minutes; the API does it when it shows a
    running job and `workers.worker.ResidentWorker` every few seconds, so a dead worker's job
    ends within its heartbeat TTL (three beats) plus that."""
    registry = StartedJobRegistry(queue_name, connection=redis)
    if not registry.get_expired_job_ids():
        return False
    registry.cleanup()
    return True


def cancel_requested(redis: Redis, job: Job) -> bool:
    """Whether a cancel was requested for the job."""
    return bool(job.meta.get("cancel_requested")) or bool(redis.exists(cancel_key(job.id)))


def _result(job: Job, rq_status: JobStatus) -> tuple[Any, str | None]:
    """(the return value, the error's last line) of an ended job."""
    if rq_status not in RQ_TERMINAL:
        return None, None
    latest = job.latest_result()
    if latest is None:
        return None, None
    if latest.type == Result.Type.SUCCESSFUL:
        return latest.return_value, None
    lines = [line for line in (latest.exc_string or "").splitlines() if line.strip()]
    # the traceback's last line is "module.ExcType: message"; keep "ExcType: message"
    last = lines[-1].strip() if lines else "the job ended without a result"
    head, sep, tail = last.partition(": ")
    if sep and " " not in head:
        last = f"{head.rsplit('.', 1)[-1]}: {tail}"
    return None, scrub(last)[:2000]


def _public_status(rq_status: JobStatus, cancelled: bool, value: Any) -> str:
    if rq_status == JobStatus.CANCELED:
        return "cancelled"
    if rq_status in (JobStatus.FAILED, JobStatus.STOPPED):
        return "cancelled" if cancelled else "failed"
    if rq_status == JobStatus.FINISHED:
        stopped = isinstance(value, dict) and value.get("cancelled") is True
        rejected = isinstance(value, dict) and value.get("rejected") is True
        return "cancelled" if stopped else "rejected" if rejected else "succeeded"
    if rq_status == JobStatus.STARTED:
        return "running"
    return "queued"  # queued, deferred, scheduled, created, ready_to_enqueue, rate_limited


def _jsonable(value: Any) -> Any:
    """`value` if it is plain JSON, else its string form (a worker could return anything)."""
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def committed_version(store: Store, job: Job) -> dict | None:
    """The manifest of the version that `job` committed on its stream, or None.

    A worker killed after it moved the stream head but before RQ stored the job's result leaves
    a failed job whose edit is in the store; the version's manifest names its job. Only the
    versions created since the job started are read (newest first, so the search is short).
    """
    started = _iso(job.started_at)
    if started is None:
        return None
    try:
        version = store.head(job.meta["model"], job.meta["stream"])
        while version is not None:
            manifest = store.manifest(version)
            if manifest.get("job") == job.id:
                return manifest
            if manifest["created_at"] < started:  # the same ISO 8601 form on both sides
                return None
            version = manifest["parent"]
    except (StoreError, KeyError):
        return None
    return None


def job_view(redis: Redis, job: Job, store: Store | None = None) -> dict:
    """Everything a client may know of a job (the JobView schema of `routers.jobs`).

    With `store`, a failed job whose version was committed (see `committed_version`) is shown
    as succeeded, its result read from the version's manifest with `"recovered": true`: the
    edit is in the stream, and a client that resubmitted it would apply it twice. `job` is shown
    as it was fetched (`fetch`; call `job.refresh()` first to show a job held for a while).
    """
    rq_status = job.get_status(refresh=False)
    cancelled = cancel_requested(redis, job)
    value, error = _result(job, rq_status)
    status = _public_status(rq_status, cancelled, value)
    job_type = job.meta.get("job_type", "edit")
    if status == "failed" and store is not None and job_type == "edit":
        manifest = committed_version(store, job)
        if manifest is not None:
            status, error = "succeeded", None
            value = {
                **{k: manifest[k] for k in ("stream", "number", "parent", "metrics")},
                "version": manifest["id"],
                "recovered": True,
            }
    position = None
    if rq_status == JobStatus.QUEUED:
        position = Queue(job.origin, connection=redis).get_job_position(job.id)
    result = None
    if status in ("succeeded", "rejected"):
        result = _jsonable(value if isinstance(value, dict) else {"value": value})
    meta = job.meta
    progress = meta.get("progress")
    curvature_key = None
    if job_type == "curvature" and isinstance(result, dict):
        curvature_key = result.get("key")
    return {
        "job_id": job.id,
        "url": f"/v1/jobs/{job.id}",
        "type": job_type,
        "status": status,
        "rq_status": str(rq_status.value if isinstance(rq_status, JobStatus) else rq_status),
        "model": meta.get("model"),
        "stream": meta.get("stream"),
        "n_facts": meta.get("n_facts"),
        "submitted_by": meta.get("actor"),
        "position": position,
        "waiting_for": _waiting_for(meta) if rq_status == JobStatus.DEFERRED else None,
        "cancel_requested": cancelled,
        "progress": _jsonable(progress) if progress is not None else None,
        "timings": {
            "submitted_at": meta.get("submitted_at"),
            "enqueued_at": _iso(job.enqueued_at),
            "started_at": _iso(job.started_at),
            "ended_at": _iso(job.ended_at),
        },
        "version": result.get("version") if isinstance(result, dict) else meta.get("version"),
        "metrics": result.get("metrics") if isinstance(result, dict) else None,
        "curvature_key": curvature_key,
        "result": result,
        "error": error if status == "failed" else None,
    }


def _waiting_for(meta: dict) -> str | None:
    """The job a deferred job waits for: its stream's previous job, else its curvature build."""
    return meta.get("after") or meta.get("curvature_job")


def cancel(redis: Redis, job: Job) -> bool:
    """Cancel a job that has not ended; True when it is cancelled now, False when the worker must.

    A job waiting in its queue is taken out (LREM: whoever removes it owns it, so a worker cannot
    start it meanwhile) and cancelled in RQ; its stream successors are then released, which is
    safe because a queued job's predecessor has ended. A deferred or running job is only flagged:
    RQ would release a deferred job's successors while its predecessor still runs, and RQ's
    stop-job command leaves a stopped job's successors deferred forever (RQ never releases the
    dependents of a STOPPED job), which would stall the stream. Raises ApiError 409 when the job
    has already ended.
    """
    job.refresh()
    rq_status = job.get_status(refresh=False)
    if rq_status in RQ_TERMINAL:
        status = _public_status(rq_status, cancel_requested(redis, job), _result(job, rq_status)[0])
        raise ApiError(409, "job_ended", f"job {job.id} has already ended ({status})")
    # Flag first: a worker that dequeues the job right now sees the request when it starts.
    redis.set(cancel_key(job.id), "1", ex=max(job.result_ttl or 0, 86400 * 7))
    job.get_meta(refresh=True)  # re-read, so the worker's latest progress is not overwritten
    job.meta["cancel_requested"] = True
    job.meta["cancel_requested_at"] = now_iso()
    job.save_meta()
    queue = Queue(job.origin, connection=redis)
    if redis.lrem(queue.key, 0, job.id):
        job.cancel(enqueue_dependents=True)
        return True
    return False
