"""Bearer API keys and per-key rate limits.

Keys are configured by their sha256 (see `service.keys`); a presented key is hashed and compared
with every configured hash using `hmac.compare_digest`, so the time taken does not tell an attacker
how much of a hash matched. The rate limit is a fixed one-minute window counted in Redis, shared
by every API process.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping

from redis import Redis
from redis.exceptions import RedisError

from service.config import ApiKey, Settings
from service.errors import ApiError
from service.keys import hash_key

log = logging.getLogger("service")

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def authenticate(settings: Settings, token: str | None) -> ApiKey:
    """The grant of the presented bearer token, or ApiError 401 (missing or unknown key)."""
    if not token:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer KEY'",
            None,
            _CHALLENGE,
        )
    presented = hash_key(token)
    found: ApiKey | None = None
    for digest, grant in settings.api_keys.items():
        # no early exit: every configured key is compared, whichever matches
        if hmac.compare_digest(presented, digest):
            found = grant
    if found is None:
        raise ApiError(401, "unauthorized", "invalid API key", None, _CHALLENGE)
    return found


def check_rate_limit(redis: Redis, key: ApiKey, per_minute: int) -> None:
    """Count one request for `key` in the current minute; ApiError 429 once over `per_minute`.

    Fails open when Redis is unreachable: the routes that need Redis answer 503 themselves, and
    the store-only routes (versions, deltas) should keep working through a Redis outage.
    """
    if per_minute <= 0:
        return
    now = time.time()
    window = int(now // 60)
    counter = f"crispedit:ratelimit:{key.name}:{window}"
    try:
        pipe = redis.pipeline()
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count, _ = pipe.execute()
    except RedisError as err:
        log.warning("rate limit not enforced, Redis unavailable: %s", err)
        return
    if count > per_minute:
        retry_after = max(1, int((window + 1) * 60 - now + 0.999))
        raise ApiError(
            429,
            "rate_limited",
            f"rate limit of {per_minute} requests per minute exceeded; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
