"""Bearer API keys, the key ring that reloads them, per-key rate limits and bad-key limits.

Keys are configured by their sha256 (see `service.keys`); a presented key is hashed and compared
with every configured hash using `hmac.compare_digest`, so the time taken does not tell an attacker
how much of a hash matched. The configured keys are those of `CRISPEDIT_API_KEYS` and of the keys
file (`CRISPEDIT_API_KEYS_FILE`), which `KeyRing` re-reads whenever the file changes (its inode,
size or mtime, checked on every request: a revocation holds from the next request) or after a
SIGHUP. The rate limits are fixed one-minute windows counted in Redis, shared by every API
process: requests per key, and requests with a missing or unknown key per client address.
"""

from __future__ import annotations

import hmac
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Mapping

from redis import Redis
from redis.exceptions import RedisError

from service.config import ApiKey, Settings
from service.errors import ApiError
from service.keys import KeysFileError, hash_key, read_keys_file

log = logging.getLogger("service")

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


class KeyRing:
    """The keys an app accepts: the settings' own plus the keys file's, re-read when it changes."""

    def __init__(self, settings: Settings):
        """Load the keys; KeysFileError when the keys file is not valid (the app cannot start)."""
        self.settings = settings
        self.path = settings.api_keys_file
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._stale = False
        self._keys = dict(settings.api_keys)
        if self.path is not None:
            self._stamp = self._stat()
            self._keys = {**settings.api_keys, **read_keys_file(self.path)}
        _RINGS.add(self)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def reload_soon(self) -> None:
        """Re-read the keys file on the next request, changed or not (SIGHUP)."""
        self._stale = True

    def keys(self) -> Mapping[str, ApiKey]:
        """sha256 -> ApiKey of every key accepted now. A keys file that became invalid is logged
        and its previous keys are kept (`python -m service.keys` never writes an invalid one)."""
        if self.path is None:
            return self._keys
        stamp = self._stat()
        if stamp == self._stamp and not self._stale:
            return self._keys
        with self._lock:
            self._stale = False
            self._stamp = stamp
            try:
                self._keys = {**self.settings.api_keys, **read_keys_file(self.path)}
                log.info("API keys reloaded from %s: %d keys", self.path, len(self._keys))
            except KeysFileError as err:
                log.error("API keys not reloaded, keeping the previous ones: %s", err)
        return self._keys

    def holds(self, key: ApiKey) -> bool:
        """Whether `key` (by its id) is still accepted: a long request (an event stream) asks
        this as it goes, so that a revocation ends it too."""
        return any(k.id == key.id for k in self.keys().values())


_RINGS: weakref.WeakSet[KeyRing] = weakref.WeakSet()


def _on_sighup(signum, frame) -> None:
    for ring in list(_RINGS):
        ring.reload_soon()


def install_sighup() -> None:
    """Make SIGHUP reload every key ring of the process (only the main thread may install it)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _on_sighup)


def authenticate(keys: Mapping[str, ApiKey], token: str | None) -> ApiKey:
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
    for digest, grant in keys.items():
        # no early exit: every configured key is compared, whichever matches
        if hmac.compare_digest(presented, digest):
            found = grant
    if found is None:
        raise ApiError(401, "unauthorized", "invalid API key", None, _CHALLENGE)
    return found


def _count_in_window(redis: Redis, counter: str, per_minute: int, name: str, refusal: str) -> None:
    """Count one request under `counter` in the current one-minute window (the Redis key
    `counter:WINDOW`, kept two minutes); ApiError 429 "`refusal`; retry in N s" with a
    `Retry-After: N` header (N the seconds left in the window) once over `per_minute`.

    No limit when `per_minute` is 0. Fails open, logging that the `name` is not enforced, when
    Redis is unreachable: the routes that need Redis answer 503 themselves, and the store-only
    routes (versions, deltas) should keep working through a Redis outage.
    """
    if per_minute <= 0:
        return
    now = time.time()
    window = int(now // 60)
    key = f"{counter}:{window}"
    try:
        pipe = redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
    except RedisError as err:
        log.warning("%s not enforced, Redis unavailable: %s", name, err)
        return
    if count > per_minute:
        retry_after = max(1, int((window + 1) * 60 - now + 0.999))
        raise ApiError(
            429,
            "rate_limited",
            f"{refusal}; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def check_rate_limit(redis: Redis, key: ApiKey, per_minute: int) -> None:
    """Count one request for `key` in the current minute; ApiError 429 once over `per_minute`
    (fails open when Redis is unreachable: `_count_in_window`)."""
    _count_in_window(
        redis,
        f"crispedit:ratelimit:{key.id or key.name}",
        per_minute,
        "rate limit",
        f"rate limit of {per_minute} requests per minute exceeded",
    )


def identify(state, client, token: str | None) -> ApiKey:
    """The key of a request to the app whose `app.state` is `state`, from `client` (Starlette's
    address pair): `authenticate` against the app's key ring; a request without a valid key is
    counted against its address's bad-key limit, and answered 429 beyond it (else 401)."""
    try:
        return authenticate(state.keys.keys(), token)
    except ApiError:
        address = client.host if client else "unknown"
        check_bad_key_limit(state.redis, address, state.settings.bad_key_limit_per_minute)
        raise


def check_bad_key_limit(redis: Redis, address: str, per_minute: int) -> None:
    """Count one request with a missing or unknown key from `address`; ApiError 429 once over
    `per_minute` this minute (fails open when Redis is unreachable, like `check_rate_limit`)."""
    _count_in_window(
        redis,
        f"crispedit:badkey:{address}",
        per_minute,
        "bad-key limit",
        "too many requests without a valid API key from this address",
    )
