"""The service's configuration: one `Settings` object read from `CRISPEDIT_*` environment variables.

Complex values are JSON, e.g.::

    CRISPEDIT_API_KEYS='{"<sha256 of the key>": {"name": "ci", "team": "team-a",
        "grants": [{"model": "smollm2", "stream": "prod-*", "role": "read"},
                   {"model": "smollm2", "role": "admin"}]}}'
    CRISPEDIT_MODELS='{"smollm2": {"layers": ["model.layers.20.mlp.down_proj"]}}'

API keys are configured by their sha256 only (`python -m service.keys hash KEY` prints it), so a
leaked configuration file does not leak a usable key. Keys may also live in a file
(`CRISPEDIT_API_KEYS_FILE`, same JSON), which `service.keyring` reloads without a restart. What a
key may do is decided in `service.access`; the legacy form `{"name", "models"}` is a key of team
`name` with `edit` on its own streams of those models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.jobs import CHECKPOINT_FUNCTION, CURVATURE_FUNCTION, JOB_FUNCTION
from contract.names import is_sha256

# Key and team names are the keys file's own (no folder is named after them, unlike
# contract.names). `$` is safe in these pydantic patterns: pydantic checks them with Rust's regex,
# where `$` matches only at the very end ("team\n" is refused: test_api_teams).
TEAM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Role = Literal["read", "edit", "admin"]


def _pattern():
    """A glob over model or stream names (fnmatch: `*`, `?`, `[...]`), or a plain name."""
    return Field(default="*", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._*?\[\]!-]+$")


class Grant(BaseModel):
    """One line of a key's grants: `role` on the streams matching `stream` of the models
    matching `model`, owned by the key's own team (`owners` null), by the listed teams, or by
    anyone (`*`)."""

    model_config = {"extra": "forbid"}
    model: str = _pattern()
    stream: str = _pattern()
    role: Role
    owners: list[str] | Literal["*"] | None = None


class ApiKey(BaseModel):
    """One API key: its name (for logs and rate limits), its team, and its ordered grants.

    `models` is the legacy form: without `grants`, the key has `edit` on its team's own streams of
    those models ("*": every served model). `id` is set from the key's sha256 by `Settings` (a
    short prefix, safe to record as who did something).
    """

    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=64, pattern=TEAM_PATTERN)
    team: str | None = Field(default=None, pattern=TEAM_PATTERN)
    models: list[str] | Literal["*"] = "*"
    grants: list[Grant] | None = None
    id: str = ""

    @model_validator(mode="after")
    def _defaults(self) -> ApiKey:
        if self.team is None:
            self.team = self.name
        if self.grants is not None and self.models != "*":
            raise ValueError("give a key `grants` or (the legacy form) `models`, not both")
        if self.grants is None:
            names = ["*"] if self.models == "*" else self.models
            self.grants = [Grant(model=name, stream="*", role="edit") for name in names]
        return self


class ServedModel(BaseModel):
    """A model the workers serve. Everything is optional: the worker knows its defaults."""

    layers: list[str] | None = None  # the edited layers, shown by GET /v1/models
    # sha256 fingerprint of the base model (crispedit.models.model_fingerprint), used to list the
    # curvature built for it before any version records it
    fingerprint: str | None = None


class Settings(BaseSettings):
    """Everything the API reads from its environment (prefix `CRISPEDIT_`)."""

    model_config = SettingsConfigDict(env_prefix="CRISPEDIT_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    store_dir: Path = Path("runs/store")
    # where `?against=base` deltas are cached; default: <store_dir>/tmp/api-cache (the store's
    # garbage collection may remove it, which only costs a recomputation)
    cache_dir: Path | None = None
    # the most bytes of cumulative deltas kept there; the least recently downloaded go first
    cache_max_bytes: int = Field(default=1 << 30, ge=0)
    api_keys: dict[str, ApiKey] = {}
    # a JSON file of more keys (same form), reloaded when it changes or on SIGHUP
    api_keys_file: Path | None = None
    # "model/stream" globs -> the team that owns matching streams, whoever creates them (and the
    # owner of matching streams created before owners were recorded)
    stream_owners: dict[str, str] = {}
    models: dict[str, ServedModel] = {}

    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # seconds a request's headers, and then its body, may take to arrive (service.server)
    read_timeout_s: float = Field(default=10.0, gt=0)
    max_facts: int = Field(default=100, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=0)  # per API key; 0 turns it off
    # requests with a missing or unknown key, per client address and minute; 0 turns it off
    bad_key_limit_per_minute: int = Field(default=60, ge=0)

    job_function: str = JOB_FUNCTION  # import path the worker resolves (tests override)
    job_timeout_s: int = Field(default=3600, ge=1)
    curvature_function: str = CURVATURE_FUNCTION  # import path of the curvature job (tests too)
    # a curvature build over a real corpus (~10k articles, an 8B model) takes hours, and an
    # interrupted one resumes from its checkpoint: the limit only stops a build that hangs
    curvature_timeout_s: int = Field(default=24 * 3600, ge=1)
    checkpoint_function: str = CHECKPOINT_FUNCTION  # import path of the checkpoint job (tests too)
    checkpoint_timeout_s: int = Field(default=3600, ge=1)
    checkpoints_kept: int = Field(default=3, ge=1)  # merged checkpoints kept, the newest
    result_ttl_s: int = Field(default=7 * 86400, ge=1)  # how long finished jobs stay readable
    failure_ttl_s: int = Field(default=7 * 86400, ge=1)
    idempotency_ttl_s: int = Field(default=86400, ge=1)

    # /metrics shows route, queue and job counts of every model: open for scrapers by default
    metrics_require_key: bool = False

    sse_poll_s: float = Field(default=0.5, gt=0)
    sse_max_s: float = Field(default=3600.0, gt=0)
    sse_keepalive_s: float = Field(default=15.0, gt=0)
    # open /events streams per API process: per key (429 beyond) and in all (503 beyond); each
    # holds a connection and polls Redis, so without a cap one key can slow every other request
    sse_max_per_key: int = Field(default=10, ge=1)
    sse_max_total: int = Field(default=500, ge=1)

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, keys: dict[str, ApiKey]) -> dict[str, ApiKey]:
        return identified_keys(keys)

    @property
    def cumulative_cache_dir(self) -> Path:
        """The folder for cached cumulative deltas."""
        return self.cache_dir or self.store_dir / "tmp" / "api-cache"


KEY_ID_CHARS = 12  # of the sha256: what job metadata, manifests and logs record as the key id


def identified_keys(keys: dict[str, ApiKey]) -> dict[str, ApiKey]:
    """`keys` (sha256 -> ApiKey) with each key's `id` set; ValueError unless keyed by sha256."""
    if not all(is_sha256(digest) for digest in keys):
        raise ValueError(
            "api_keys must be keyed by the lowercase sha256 hex of each key "
            "(python -m service.keys hash KEY)"
        )
    return {d: k.model_copy(update={"id": d[:KEY_ID_CHARS]}) for d, k in keys.items()}
