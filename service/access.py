"""Who may do what: the one place that decides whether a key may read, edit or administer a stream.

Every route asks `may(key, role, model, stream)` (or `require`, which answers 404 so that ids and
stream names of other teams do not leak). Roles are ordered: `read` (jobs, versions, deltas,
events), `edit` (also submit), `admin` (also rollback, policies, overrides, curvature builds).
Today a key is scoped to models only; team and stream grants build on this same function.
"""

from __future__ import annotations

from typing import Literal

from service.config import ApiKey
from service.errors import ApiError

Role = Literal["read", "edit", "admin"]
ROLES: tuple[Role, ...] = ("read", "edit", "admin")


def may(key: ApiKey, role: Role, model: str, stream: str | None = None) -> bool:
    """Whether `key` holds `role` (or a higher one) on `stream` of `model` (any stream if None)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {ROLES}")
    return key.allows(model)


def require(key: ApiKey, role: Role, model: str, stream: str | None, what: str, field: str) -> None:
    """ApiError 404 (`what` not found, naming `field`) unless `key` may act as `role` there."""
    if not may(key, role, model, stream):
        raise ApiError(404, "not_found", f"{what} not found", field)
