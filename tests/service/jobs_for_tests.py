"""Stand-ins for the worker's job function, run in the test process by the
real worker class (`workers.worker.ResidentWorker`).

They follow the job contract of `service.jobqueue` without the engine: report progress in the
job's meta, honour a cancel request, check the expected parent, publish a tiny version through the
store and return `{"version", "metrics"}`. The store folder comes from `CRISPEDIT_TEST_STORE`.
"""

from __future__ import annotations

import os

import numpy as np
from api_helpers import record_built
from rq import get_current_job
from safetensors.numpy import save_file

from contract.jobs import curvature_spec
from curvature_store import Conflict, Store

ORDER_KEY = "test:order"  # a Redis list of job ids in the order their edits ran


class JobCancelled(Exception):
    """The job was cancelled before it published anything."""


def _progress(job, **progress) -> None:
    job.get_meta(refresh=True)  # merge: never overwrite the API's cancel flag
    job.meta["progress"] = progress
    job.save_meta()


def apply_edit(payload: dict) -> dict:
    """Publish a version whose delta is one 2x2 tensor filled with the number of facts."""
    job = get_current_job()
    if job.get_meta(refresh=True).get("cancel_requested"):
        raise JobCancelled("cancelled before it started")
    job.connection.rpush(ORDER_KEY, job.id)
    n = len(payload["facts"])
    _progress(job, phase="editing", epoch=1, loss=0.5, facts_done=0)
    store = Store(os.environ["CRISPEDIT_TEST_STORE"])
    model, stream = payload["model"], payload["stream"]
    head = store.head(model, stream)
    if payload["check_parent"] and payload["parent_version"] != head:
        raise Conflict(f"stream {model}/{stream} has head {head}", head=head)
    stage = store.staging_dir()
    save_file(
        {"layer.weight": np.full((2, 2), float(n), dtype=np.float32)}, stage / "d.safetensors"
    )
    doc = store.create_version(
        model,
        stream,
        head,
        {"delta.safetensors": stage / "d.safetensors"},
        {"facts": payload["facts"], "method": "ft", "metrics": {"n_edits": n, "efficacy": 1.0}},
        actor=payload.get("actor"),
    )
    _progress(job, phase="done", epoch=1, loss=0.01, facts_done=n)
    return {"version": doc["id"], "metrics": {"n_edits": n, "efficacy": 1.0}}


def fail_edit(payload: dict) -> dict:
    """Fail the way an engine error would: an exception with a one-line message."""
    raise ValueError("the edit diverged: loss is nan at epoch 3")


def commit_then_fail(payload: dict) -> dict:
    """Publish the version (its manifest naming the job, as the engine's does), then fail: what
    RQ records when a worker dies right after the commit point."""
    job = get_current_job()
    store = Store(os.environ["CRISPEDIT_TEST_STORE"])
    model, stream = payload["model"], payload["stream"]
    stage = store.staging_dir()
    save_file({"layer.weight": np.ones((2, 2), dtype=np.float32)}, stage / "d.safetensors")
    store.create_version(
        model,
        stream,
        store.head(model, stream),
        {"delta.safetensors": stage / "d.safetensors"},
        {"facts": payload["facts"], "method": "ft", "metrics": {"efficacy": 1.0}, "job": job.id},
    )
    raise SystemError("worker lost after the commit")


def build_curvature(payload: dict) -> dict:
    """Store a stand-in curvature file under key fields made from the request, record it as a
    worker does (`contract.jobs.curvature_index_key`) and return the job contract's result."""
    job = get_current_job()
    if job.get_meta(refresh=True).get("cancel_requested"):
        raise JobCancelled("cancelled before it started")
    job.connection.rpush(ORDER_KEY, job.id)
    _progress(job, phase="curvature", tokens_done=0, tokens_total=100)
    store = Store(os.environ["CRISPEDIT_TEST_STORE"])
    spec = curvature_spec(payload["kind"], payload["tokens"], payload["corpus"])
    key = record_built(job.connection, store, payload["model"], spec)
    _progress(job, phase="curvature", tokens_done=100, tokens_total=100)
    return {"key": key, "kind": payload["kind"], "tokens": 100, "cache_hit": False,
            "resumed_from": None, "seconds": 0.0}  # fmt: skip


def fail_curvature(payload: dict) -> dict:
    """Fail the way a build on a missing corpus would."""
    raise FileNotFoundError("corpus /data/corpus/missing.jsonl does not exist")


def write_checkpoint(payload: dict) -> dict:
    """Write a stand-in checkpoint (a config and two 'shards' of known bytes) through the real
    store functions, then apply the retention, as the worker's job does."""
    from curvature_store.checkpoints import prune, publish_checkpoint

    job = get_current_job()
    _progress(job, phase="checkpoint", version=payload["version"])
    store = Store(os.environ["CRISPEDIT_TEST_STORE"])
    stage = store.staging_dir()
    (stage / "config.json").write_text('{"model_type": "llama"}')
    for i in (1, 2):
        (stage / f"model-0000{i}-of-00002.safetensors").write_bytes(bytes(range(256)) * 40 * i)
    manifest = publish_checkpoint(store, payload["version"], stage)
    pruned = prune(store, payload["keep"])
    return {"version": payload["version"], "files": sorted(manifest["files"]), "pruned": pruned}
