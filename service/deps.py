"""FastAPI dependencies: settings, the store, Redis, the caller's API key, and path checks.

Routers declare what they need with the `Annotated` aliases (`SettingsDep`, `StoreDep`,
`RedisDep`, `KeyDep`, `StreamReadDep`, `StreamAdminDep`); everything lives on `app.state`, set up
by `service.main.create_app`, so each app instance (tests make many) has its own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis

from contract.names import NAME_RULE, VERSION_RULE, is_name, is_version_id
from curvature_store import NotFound, Store, StoreError
from service import access
from service.auth import check_rate_limit, identify
from service.config import ApiKey, Role, Settings
from service.errors import ApiError

_STORE_LOCK = threading.Lock()


# Dependencies that do no I/O (or only once) are `async def`: FastAPI runs a plain `def` one in its
# thread pool, and those hops, several per request, dominated latency under load (bench/load.py).


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


async def get_redis(request: Request) -> Redis:
    """The app's Redis client (a connection pool; created lazily, so it never blocks startup)."""
    return request.app.state.redis


def open_store(state) -> Store:
    """The app's store, opened on first use (creating an empty one if the folder has none).

    Opened lazily so that the API starts, and answers /healthz and /readyz, even while the shared
    volume is not mounted yet. Raises StoreError or OSError when it cannot be opened.
    """
    with _STORE_LOCK:
        if state.store is None:
            state.store = Store(state.settings.store_dir)
        return state.store


async def get_store_if_open(request: Request) -> Store | None:
    """The app's store, or None when it cannot be opened (for routes that only consult it)."""
    try:
        return open_store(request.app.state)
    except (StoreError, OSError):
        return None


async def get_store(request: Request) -> Store:
    """The app's store, or 503 when it cannot be opened."""
    store = await get_store_if_open(request)
    if store is None:
        raise ApiError(503, "unavailable", "the version store is unavailable")
    return store


# auto_error=False: a missing or non-Bearer header must get our 401 shape, not FastAPI's 403
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer KEY`.")


def current_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's API key (401 without a valid key), counted against its rate limit; a request
    without a valid key is counted against its client address's bad-key limit (429 beyond)."""
    state = request.app.state
    key = identify(state, request.client, credentials.credentials if credentials else None)
    check_rate_limit(state.redis, key, state.settings.rate_limit_per_minute)
    return key


def metrics_access(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """For /metrics: nothing by default (scrapers hold no key), a valid API key (as
    `current_key`) when `metrics_require_key` is set."""
    if request.app.state.settings.metrics_require_key:
        current_key(request, credentials)


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
StoreDep = Annotated[Store, Depends(get_store)]
MaybeStoreDep = Annotated[Store | None, Depends(get_store_if_open)]
KeyDep = Annotated[ApiKey, Depends(current_key)]


def check_name(value: str, field: str) -> str:
    """A model or stream name as the store accepts it, or 400 naming the field (path traversal)."""
    if not is_name(value):
        raise ApiError(400, "invalid_name", f"invalid {field} name: {NAME_RULE}", field)
    return value


def check_version_id(value: str, field: str = "version_id") -> str:
    """A well-formed version id (`v` + 26 hex digits), or 400 naming the field."""
    if not is_version_id(value):
        raise ApiError(400, "invalid_id", f"invalid version id: {VERSION_RULE}", field)
    return value


def version_for(
    settings: Settings, store: Store, key: ApiKey, version_id: str, role: Role = "read"
) -> dict:
    """The version's manifest when `key` holds `role` on its stream (service.access); else 404,
    as for an unknown id (400 for a malformed one), so that another team's ids do not leak."""
    check_version_id(version_id)
    not_found = ApiError(404, "not_found", f"no version {version_id}", "version_id")
    try:
        manifest = store.manifest(version_id)
    except NotFound:
        raise not_found from None
    model, stream = manifest["model"], manifest["stream"]
    access.require(
        key, role, model, stream, access.owner_of(settings, store, model, stream), not_found
    )
    return manifest


def served_model(settings: Settings, key: ApiKey, model: str, field: str = "model") -> str:
    """`model` if it is served and the key holds a grant on it; else 404, the same answer for
    both, so that a key does not learn which models other teams use."""
    if model not in settings.models or not access.may(key, "read", model):
        raise ApiError(404, "unknown_model", f"model {model!r} is not served", field)
    return model


@dataclass(frozen=True)
class StreamRef:
    """A checked `{model}/{stream}` pair from a request path, and the team that owns it."""

    model: str
    stream: str
    owner: str | None


def unknown_stream(model: str, stream: str) -> ApiError:
    """The 404 of a stream that does not exist, or that the key may not see (the same answer)."""
    return ApiError(404, "unknown_stream", f"no stream {model}/{stream}", "stream")


def stream_for(role: Role):
    """A dependency: the path's model and stream, well-formed (400), served (404), on which the
    key holds `role` (404 otherwise, as for a stream that does not exist)."""

    async def dependency(
        model: str, stream: str, settings: SettingsDep, key: KeyDep, store: MaybeStoreDep
    ) -> StreamRef:
        check_name(model, "model")
        check_name(stream, "stream")
        served_model(settings, key, model)
        owner = access.owner_of(settings, store, model, stream)
        if not access.may(key, role, model, stream, owner):
            raise unknown_stream(model, stream)
        return StreamRef(model, stream, owner)

    return dependency


StreamReadDep = Annotated[StreamRef, Depends(stream_for("read"))]
StreamAdminDep = Annotated[StreamRef, Depends(stream_for("admin"))]


async def require_json(request: Request) -> None:
    """415 unless the request body is declared as JSON (`application/json` or `...+json`)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)"
        )
