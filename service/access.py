"""Who may do what: the one place that decides whether a key may read, edit or administer a stream.

A key belongs to a team and carries ordered grants (`service.config.Grant`): a model and a stream,
each a name or a glob, the teams whose streams it covers (null: the key's own team), and a role.
Roles are ordered: `read` (jobs and their events, versions, deltas, adapters, checkpoints, the
log, the policy, `generate`), `edit` (also submit, cancel, create a checkpoint), `admin` (also
rollback, publish, put and delete the policy, `options.force`). The first grant that matches a
stream decides the key's role there, so a narrower grant listed first can lower what a broader one
gives. A curvature build is the model's: it needs `admin` in any grant on the model.

A stream is owned by the team whose edit created it (`claim`), unless `Settings.stream_owners`
names its owner; a stream nobody owns yet (new, or made before owners were recorded) is treated
as the asking key's own. Routes ask `may` or `require`; `require` answers 404, as for something
that does not exist, so that ids and stream names of other teams do not leak.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from curvature_store import Store
from service.config import ApiKey, Grant, Role, Settings
from service.errors import ApiError

ROLES: tuple[Role, ...] = ("read", "edit", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}


def _covers(grant: Grant, key: ApiKey, model: str, stream: str | None, owner: str | None) -> bool:
    if not fnmatchcase(model, grant.model):
        return False
    if stream is None:  # the model as a whole: any grant on it
        return True
    if not fnmatchcase(stream, grant.stream):
        return False
    owner = owner or key.team  # nobody's yet: it would be the key's team's
    return grant.owners == "*" or owner in (grant.owners or [key.team])


def role_of(
    key: ApiKey, model: str, stream: str | None = None, owner: str | None = None
) -> Role | None:
    """The key's role on `stream` (owned by team `owner`) of `model`, or None. With `stream`
    None: the highest role any of its grants on `model` gives (curvature, the models list)."""
    found = [g.role for g in key.grants or [] if _covers(g, key, model, stream, owner)]
    if not found:
        return None
    return max(found, key=_RANK.__getitem__) if stream is None else found[0]


def may(
    key: ApiKey, role: Role, model: str, stream: str | None = None, owner: str | None = None
) -> bool:
    """Whether `key` holds `role` (or a higher one) on `stream` of `model`, a stream owned by
    team `owner` (None: nobody yet); with `stream` None, on the model as a whole."""
    if role not in _RANK:
        raise ValueError(f"unknown role {role!r}: one of {ROLES}")
    held = role_of(key, model, stream, owner)
    return held is not None and _RANK[held] >= _RANK[role]


def require(
    key: ApiKey,
    role: Role,
    model: str,
    stream: str | None,
    owner: str | None,
    not_found: ApiError,
) -> None:
    """Raise `not_found` (the route's 404 for something that does not exist) unless `key` may act
    as `role` there: what a key may not see answers exactly as what is not there."""
    if not may(key, role, model, stream, owner):
        raise not_found


def owner_of(settings: Settings, store: Store | None, model: str, stream: str) -> str | None:
    """The team that owns `model`/`stream`: recorded in the store when the stream was claimed,
    else configured (`Settings.stream_owners`), else None (nobody's yet)."""
    if store is not None:
        recorded = store.stream_owner(model, stream)
        if recorded is not None:
            return recorded["team"]
    return configured_owner(settings, model, stream)


def configured_owner(settings: Settings, model: str, stream: str) -> str | None:
    """The owner `Settings.stream_owners` gives `model`/`stream` (first matching glob), or None."""
    for pattern, team in settings.stream_owners.items():
        if fnmatchcase(f"{model}/{stream}", pattern):
            return team
    return None


def claim(settings: Settings, store: Store, key: ApiKey, model: str, stream: str) -> str:
    """Make `key`'s team (or the configured owner) the owner of the stream unless it has one;
    the owner. Atomic in the store: of two teams racing to create one stream, one owns it."""
    team = configured_owner(settings, model, stream) or key.team
    return store.claim_stream(model, stream, {"team": team, "by": actor(key)})["team"]


def job_scope(settings: Settings, store: Store, key: ApiKey, manifest: dict) -> dict:
    """The job metadata that decides who may see a job about a version (a checkpoint, a
    generation): the version's stream and its owner, as for an edit of that stream, and who
    asked."""
    model, stream = manifest["model"], manifest["stream"]
    return {
        "stream": stream,
        "owner": owner_of(settings, store, model, stream),
        "actor": actor(key),
    }


def actor(key: ApiKey) -> dict:
    """Who did something, as job metadata, manifests and stream logs record it: the team and the
    key's id (a short prefix of its sha256), never the key."""
    return {"team": key.team, "key_id": key.id}
