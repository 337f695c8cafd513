"""Constants and helpers shared by the API tests (a module of its own: test files cannot import
a conftest when several folders have one)."""

from __future__ import annotations

import hashlib

import numpy as np
from live import redis_url
from redis import Redis
from rq import Queue
from safetensors.numpy import save_file

from contract.jobs import curvature_index_key, queue_name
from curvature_store import Store
from workers.worker import ResidentWorker

REDIS_URL = redis_url(15)
KEY_ALL = "key-for-every-model"
KEY_TINY = "key-for-tiny-only"
KEY_TINY_ADMIN = "key-for-tiny-admin"  # team "tiny-only" too, with the admin role on "tiny"
KEY_A = "key-of-team-a-admin"  # team-a: admin on every model
KEY_A_READ = "key-of-team-a-reader"  # team-a: read on every model
KEY_B = "key-of-team-b-admin"  # team-b: admin on every model
AUTH = {"Authorization": f"Bearer {KEY_ALL}"}
AUTH_TINY = {"Authorization": f"Bearer {KEY_TINY}"}
AUTH_TINY_ADMIN = {"Authorization": f"Bearer {KEY_TINY_ADMIN}"}
AUTH_ADMIN = {"Authorization": f"Bearer {KEY_A}"}  # rollback and curvature builds need admin


def bearer(key: str) -> dict:
    """The Authorization header of `key`."""
    return {"Authorization": f"Bearer {key}"}


def run_worker(redis: Redis, model: str = "tiny") -> None:
    """Run every job of the model's queue (and those they release) in this process, then return."""
    queue = Queue(queue_name(model), connection=redis)
    ResidentWorker([queue], connection=redis).work(burst=True, with_scheduler=False)


def job_count(redis: Redis) -> int:
    """How many RQ jobs exist (to check that a refused request enqueued nothing)."""
    return sum(1 for _ in redis.scan_iter("rq:job:*"))


def make_version(store: Store, model: str, stream: str, value: float, shape=(2, 3)) -> dict:
    """Publish a version on the stream head whose delta is `layer.weight` filled with `value`."""
    stage = store.staging_dir()
    tensors = {
        "layer.weight": np.full(shape, value, dtype=np.float32),
        "other.weight": np.arange(4, dtype=np.float32) * value,
    }
    save_file(tensors, stage / "delta.safetensors")
    return store.create_version(
        model,
        stream,
        store.head(model, stream),
        {"delta.safetensors": stage / "delta.safetensors"},
        {"facts": [{"prompt": "p", "target": "t"}], "method": "ft", "metrics": {"efficacy": 1.0}},
    )


def fact(**overrides) -> dict:
    """A valid fact record, with overrides."""
    return {"subject": "France", "relation": "P36", "target": "Lyon", **overrides}


def edit_body(n: int = 1, **overrides) -> dict:
    """A valid POST /v1/edits body for model "tiny" with `n` facts."""
    body = {"model": "tiny", "facts": [fact(target=f"City{i}") for i in range(n)]}
    body.update(overrides)
    return body


def record_built(redis: Redis, store: Store, model: str, spec: str) -> str:
    """Put a stand-in curvature of `model` for `spec` in the store and record it; its key."""
    stage = store.staging_dir()
    save_file({"layer/A": np.eye(2, dtype=np.float32)}, stage / "curvature.safetensors")
    fields = {
        "model_fingerprint": f"fingerprint-of-{model}",
        "layers": ["layer"],
        "corpus_digest": hashlib.sha256(spec.encode()).hexdigest(),
        "tokens": 100,
        "labels": "empirical",
        "kind": "ekfac" if '"ekfac"' in spec else "kfac",
        "format_version": 1,
    }
    key = store.put_curvature(stage / "curvature.safetensors", fields)["key"]
    redis.hset(curvature_index_key(model), spec, key)
    return key
