"""FastAPI dependencies: settings, the store, Redis, the caller's API key, and path checks.

Routers declare what they need with the `Annotated` aliases at the bottom (`SettingsDep`,
`StoreDep`, `RedisDep`, `KeyDep`, `StreamDep`); everything lives on `app.state`, set up by
`service.main.create_app`, so each app instance (tests make many) has its own.
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
from service.access import Role, require
from service.auth import authenticate, check_rate_limit
from service.config import ApiKey, Settings
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
    """The caller's API key grant (401 without a valid key), counted against its rate limit."""
    settings = request.app.state.settings
    key = authenticate(settings, credentials.credentials if credentials else None)
    check_rate_limit(request.app.state.redis, key, settings.rate_limit_per_minute)
    return key


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


def version_for(store: Store, key: ApiKey, version_id: str, role: Role) -> dict:
    """The version's manifest when `key` holds `role` on its stream (service.access); else 404,
    as for an unknown id (400 for a malformed one)."""
    check_version_id(version_id)
    try:
        manifest = store.manifest(version_id)
    except NotFound:
        raise ApiError(404, "not_found", f"no version {version_id}", "version_id") from None
    require(key, role, manifest["model"], manifest["stream"], f"version {version_id}", "version_id")
    return manifest


def served_model(settings: Settings, key: ApiKey, model: str, field: str = "model") -> str:
    """`model` if it is served (else 404) and the key may use it (else 403)."""
    if model not in settings.models:
        raise ApiError(404, "unknown_model", f"model {model!r} is not served", field)
    if not key.allows(model):
        raise ApiError(403, "forbidden", f"this API key may not use model {model!r}", field)
    return model


@dataclass(frozen=True)
class StreamRef:
    """A checked `{model}/{stream}` pair from a request path."""

    model: str
    stream: str


async def stream_ref(model: str, stream: str, settings: SettingsDep, key: KeyDep) -> StreamRef:
    """The path's model and stream: well-formed (400), served (404), allowed for the key (403)."""
    check_name(model, "model")
    check_name(stream, "stream")
    return StreamRef(served_model(settings, key, model), stream)


StreamDep = Annotated[StreamRef, Depends(stream_ref)]


async def require_json(request: Request) -> None:
    """415 unless the request body is declared as JSON (`application/json` or `...+json`)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", "send the body as JSON (Content-Type: application/json)"
        )
