"""One error shape for every failure: `{"error": {"code", "message", "field"?}}`.

Handlers here turn our own `ApiError`, FastAPI's validation errors, Starlette's HTTP errors (unknown
route, wrong method), store errors and Redis outages into that shape. Messages are written for API
users: they never hold a filesystem path or a traceback (store messages are relative to the store
root by design; anything unexpected becomes a bare 500).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from curvature_store import Conflict, Corrupt, NotFound, StoreError

log = logging.getLogger("service")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with `status` (and optional extra headers)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: object,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        self.extra = extra  # more keys for the error object, e.g. the current head on a 409


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    """A JSONResponse in the error shape (`field` only when known)."""
    error: dict[str, object] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    error.update(extra)
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def field_path(loc: Sequence[str | int]) -> str:
    """A pydantic error location as a field path: ("body", "facts", 0, "target") → facts[0].target.

    The leading "body"/"query"/"path"/"header" is dropped: the field name says enough.
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


# Starlette's plain HTTP errors (routing) get a stable code per status.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}

# Absolute paths in messages that come from below us (a job's exception) are cut to their last part.
_ABS_PATH_RE = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"]+/)+")


def scrub(message: str) -> str:
    """`message` with absolute folder prefixes removed ("/srv/store/x/y.json" → "y.json")."""
    return _ABS_PATH_RE.sub("", message)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(
        exc.status, exc.code, exc.message, exc.field, headers=exc.headers, **exc.extra
    )


async def _unauthorized(request: Request) -> JSONResponse | None:
    """The 401 answer for a /v1 request without a valid key, else None.

    FastAPI parses (and rejects) the body before it runs any dependency, the API key check
    included; a caller without a valid key must get 401, not a hint about the body.
    """
    if not request.url.path.startswith("/v1/"):
        return None
    from service.auth import bearer_token, identify  # service.auth imports this module

    try:
        identify(request.app.state, request.client, bearer_token(request.headers))
    except ApiError as err:
        return await _api_error(request, err)
    return None


# What FastAPI answers (400) for a body its JSON decoder raised on with something other than a
# JSON syntax error: bytes that are not UTF-8, or nesting too deep for the decoder.
_BODY_PARSE_ERROR = "There was an error parsing the body"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    if (refused := await _unauthorized(request)) is not None:
        return refused
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        field = "body"
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        message = f"body: invalid JSON at character {first['loc'][-1]}: {reason}"
    else:
        field = field_path(first.get("loc", ()))
        message = f"{field}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, "invalid_request", message, field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_ERROR:
        if (refused := await _unauthorized(request)) is not None:
            return refused
        # the same answer as any other body that is not JSON
        message = "body: invalid JSON: not UTF-8, or nested too deeply"
        return error_response(422, "invalid_request", message, "body")
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    # Routers catch the store errors whose field they know; this is the fallback.
    if isinstance(exc, NotFound):
        return error_response(404, "not_found", str(exc))
    if isinstance(exc, Conflict):
        return error_response(409, "conflict", str(exc), head=exc.head)
    if isinstance(exc, Corrupt):
        log.error("store corruption: %s", exc)
        return error_response(500, "corrupt", f"stored data failed verification: {exc}")
    return error_response(400, "bad_request", str(exc))


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable: %s", exc)
    return error_response(503, "unavailable", "the job queue (Redis) is unavailable; retry later")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler above on `app`."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)


def responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries declaring the error shape for these statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}
