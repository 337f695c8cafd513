"""`Idempotency-Key` for POST /v1/edits: a retried request gets the job of the first one.

A record per (API key, idempotency key) lives in Redis for `Settings.idempotency_ttl_s`:
`{"digest": sha256 of the request, "job_id", "state": "pending" | "done"}`. It is reserved with
SET NX before the job is enqueued, so two concurrent requests with the same key cannot both
enqueue; the loser sees the reservation and gets the same job (or a 409 while it is pending, or
when its body differs).
"""

from __future__ import annotations

import hashlib
import json

from redis import Redis

from service.errors import ApiError


def request_digest(document: object) -> str:
    """sha256 of a request's canonical JSON (sorted keys, compact): equal bodies, equal digest."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _key(key_name: str, idempotency_key: str) -> str:
    # hashed: the client's key may hold any characters, and need not be readable in Redis
    digest = hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:32]
    return f"crispedit:idem:{key_name}:{digest}"


def reserve(
    redis: Redis, key_name: str, idempotency_key: str, digest: str, job_id: str, ttl_s: int
) -> str | None:
    """Reserve the key for a new job `job_id`: None when reserved, else the earlier job's id.

    Raises ApiError 409 when the key was used with a different request body, or when the first
    request with this key is still being processed.
    """
    key = _key(key_name, idempotency_key)
    record = {"digest": digest, "job_id": job_id, "state": "pending"}
    if redis.set(key, json.dumps(record), nx=True, ex=ttl_s):
        return None
    raw = redis.get(key)
    if raw is None:  # expired between the two calls: try once more
        if redis.set(key, json.dumps(record), nx=True, ex=ttl_s):
            return None
        raw = redis.get(key) or b"{}"
    earlier = json.loads(raw)
    if earlier.get("digest") != digest:
        raise ApiError(
            409,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body",
            "Idempotency-Key",
        )
    if earlier.get("state") != "done":
        raise ApiError(
            409,
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still being processed; retry shortly",
            "Idempotency-Key",
        )
    return earlier["job_id"]


def complete(redis: Redis, key_name: str, idempotency_key: str, digest: str, job_id: str) -> None:
    """Mark the reservation done: later retries get `job_id`."""
    record = {"digest": digest, "job_id": job_id, "state": "done"}
    redis.set(_key(key_name, idempotency_key), json.dumps(record), keepttl=True)


def release(redis: Redis, key_name: str, idempotency_key: str) -> None:
    """Drop a reservation whose request failed, so that a retry can enqueue the job after all."""
    redis.delete(_key(key_name, idempotency_key))
