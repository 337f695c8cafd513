"""The job contract between the API and the workers.

The API enqueues, on the RQ queue `crispedit:{model}`, the function `workers.jobs.apply_edit` (by
its dotted path, so the API never imports torch) with one JSON-able argument:

    {"model", "stream", "facts": [records in crispedit.facts' own form], "parent_version": id|None,
     "options": {method?, gamma?, layers?, epochs?, lr?, evaluate?}, "submitted_at", "key_name"}

While it runs, the job's meta holds `progress` ({phase, epoch, epochs, loss, facts_total,
facts_done}); the API sets `cancel_requested` in the meta to stop it at the next epoch. The return
value is {version, number, parent, stream, metrics, seconds}. A failed or cancelled job publishes
no version.
"""

from __future__ import annotations

from rq import get_current_job

from workers.engine import Engine

_ENGINES: dict[str, Engine] = {}


def queue_name(model: str) -> str:
    """The RQ queue of a served model."""
    return f"crispedit:{model}"


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
            job.meta["progress"] = progress
            job.save_meta()

    def cancelled() -> bool:
        return bool(job is not None and job.get_meta(refresh=True).get("cancel_requested"))

    return engine.apply(request, report, cancelled)
