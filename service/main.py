"""The app factory: `create_app(settings)` wires settings, Redis, the store, middleware and routers.

Run it with `uvicorn --factory service.main:create_app --http service.server:TimedH11Protocol`
(settings from `CRISPEDIT_*` variables; the protocol gives request headers a deadline).
Nothing here, nor anything it imports, imports torch: the engine runs in the workers only.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from redis import Redis

from service.auth import KeyRing, install_sighup
from service.config import Settings
from service.console import mount_console
from service.deps import current_key
from service.errors import install_error_handlers, responses
from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.routers import (
    checkpoints,
    curvature,
    edits,
    health,
    jobs,
    models,
    policies,
    relations,
    streams,
    versions,
)

API_VERSION = "1.0.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Freeze what startup allocated out of the garbage collector's reach: otherwise every full
    collection rescans the framework's and the schema's objects, pausing every request in the
    process for 50-80 ms (seen under bench/load.py; after the freeze, 5-30 ms)."""
    gc.collect()
    gc.freeze()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app for `settings` (default: read from the environment)."""
    settings = settings or Settings()
    app = FastAPI(
        title="CrispEdit service",
        version=API_VERSION,
        description=(
            "Editing-as-a-service: post fact edits, follow the job, download the weight delta. "
            "Every /v1 route needs `Authorization: Bearer KEY`. Errors are "
            '`{"error": {"code", "message", "field"?}}`.'
        ),
        lifespan=lifespan,
        # no redirect from /path/ to /path: Starlette builds its Location from the Host header,
        # which a client controls; an unknown path is the JSON 404 of any other
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.keys = KeyRing(settings)  # the keys file, re-read when it changes or on SIGHUP
    install_sighup()
    # Lazy connections: the app starts (and /healthz answers) while Redis is still coming up.
    app.state.redis = Redis.from_url(
        settings.redis_url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
    )
    app.state.store = None  # opened on first use, see service.deps.open_store
    app.state.metrics = Metrics(app.state.redis, lambda: sorted(settings.models))

    install_error_handlers(app)
    # Added last = outermost: metrics see every request, including those refused as too large.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.read_timeout_s
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)

    app.include_router(health.router)
    for module in (
        edits,
        curvature,
        jobs,
        streams,
        policies,
        versions,
        checkpoints,
        models,
        relations,
    ):
        # every /v1 route: the API key, and the errors any of them can answer
        app.include_router(
            module.router,
            dependencies=[Depends(current_key)],
            responses=responses(401, 422, 429, 503),
        )
    mount_console(app)  # the web console's static files, at /console/ (no key: the page asks)
    return app
