"""The job contract between the API and the workers.

The API enqueues, on the RQ queue `crispedit:{model}`, the function `workers.jobs.apply_edit` (by
its dotted path, so the API never imports torch) with one JSON-able argument:

    {"model", "stream", "facts": [records in contract.facts' own form], "parent_version": id|None,
     "check_parent": bool,
     "options": {method?, gamma?, layers?, epochs?, lr?, anchors?, anchor_weight?, clip?,
                 evaluate?},
     "submitted_at", "key_name"}

`check_parent` true means the head must be `parent_version` (None: the base) when the job runs.
While it runs, the job's meta holds `progress` ({phase, epoch, epochs, loss, facts_total,
facts_done}); the API sets `cancel_requested` in the meta and the key `crispedit:cancel:{id}` to
stop it before it starts work or at the next epoch. The return value is {version, number, parent,
stream, metrics, seconds}, and the version's manifest names the job (`job`). A failed or
cancelled job publishes no version, except a job whose worker died after committing its version:
the API then reports the job as succeeded from that manifest (`service.jobqueue.job_view`).
"""

from __future__ import annotations

from rq import get_current_job

from workers.engine import Engine

_ENGINES: dict[str, Engine] = {}


def queue_name(model: str) -> str:
    """The RQ queue of a served model."""
    return f"crispedit:{model}"


def cancel_key(job_id: str) -> str:
    """The Redis key the API sets when a job's cancellation is requested."""
    return f"crispedit:cancel:{job_id}"


def register(engine: Engine) -> None:
    """Make `engine` the resident engine for its model in this process."""
    _ENGINES[engine.name] = engine


def apply_edit(request: dict) -> dict:
    """RQ job: apply an edit request with this process's resident engine (see module doc)."""
    engine = _ENGINES.get(request.get("model"))
    if engine is None:
        raise RuntimeError(f"no resident engine for model {request.get('model')!r} here")
    job = get_current_job()

    def report(progress: dict) -> None:
        if job is not None:
            job.meta = job.get_meta(refresh=True)  # keep what the API wrote meanwhile (a cancel)
            job.meta["progress"] = progress
            job.save_meta()

    def cancelled() -> bool:
        if job is None:
            return False
        # the API sets both: the key survives a meta save that raced with its request
        flagged = job.connection.exists(cancel_key(job.id))
        return bool(flagged or job.get_meta(refresh=True).get("cancel_requested"))

    return engine.apply(request, report, cancelled, job_id=job.id if job is not None else None)
