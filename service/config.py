"""The service's configuration: one `Settings` object read from `CRISPEDIT_*` environment variables.

Complex values are JSON, e.g.::

    CRISPEDIT_API_KEYS='{"<sha256 of the key>": {"name": "team-a", "models": ["smollm2"]}}'
    CRISPEDIT_MODELS='{"smollm2": {"layers": ["model.layers.20.mlp.down_proj"]}}'

API keys are configured by their sha256 only (`python -m service.keys hash KEY` prints it), so a
leaked configuration file does not leak a usable key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.jobs import CHECKPOINT_FUNCTION, CURVATURE_FUNCTION, JOB_FUNCTION

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ApiKey(BaseModel):
    """One API key's grant: a name (for logs, job metadata, rate limits) and its models."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    models: list[str] | Literal["*"] = "*"

    def allows(self, model: str) -> bool:
        """Whether this key may use `model` ("*" grants every served model)."""
        return self.models == "*" or model in self.models


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
    api_keys: dict[str, ApiKey] = {}
    models: dict[str, ServedModel] = {}

    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_facts: int = Field(default=100, ge=1)
    rate_limit_per_minute: int = Field(default=600, ge=0)  # per API key; 0 turns it off

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

    sse_poll_s: float = Field(default=0.5, gt=0)
    sse_max_s: float = Field(default=3600.0, gt=0)
    sse_keepalive_s: float = Field(default=15.0, gt=0)

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, keys: dict[str, ApiKey]) -> dict[str, ApiKey]:
        bad = [k for k in keys if not SHA256_RE.match(k)]
        if bad:
            raise ValueError(
                "api_keys must be keyed by the lowercase sha256 hex of each key "
                "(python -m service.keys hash KEY)"
            )
        return keys

    @property
    def cumulative_cache_dir(self) -> Path:
        """The folder for cached cumulative deltas."""
        return self.cache_dir or self.store_dir / "tmp" / "api-cache"
