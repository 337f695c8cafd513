"""Fixtures for the API tests: real Redis (database 15, flushed per test), a real store in
tmp_path, real RQ queues and workers, the app through TestClient or a real uvicorn server.

Test files are named test_api_*.py: tests/ has no packages, so their basenames must differ from
the other test folders' (tests/crispedit/test_streams.py exists).
"""

from __future__ import annotations

import pytest
from api_helpers import (
    KEY_A,
    KEY_A_READ,
    KEY_ALL,
    KEY_B,
    KEY_TINY,
    KEY_TINY_ADMIN,
    REDIS_URL,
    record_built,
)
from fastapi.testclient import TestClient
from live import redis_db, serve

from contract.jobs import CURVATURE_KINDS, curvature_spec
from curvature_store import Store
from service.config import Settings
from service.keys import hash_key
from service.main import create_app


@pytest.fixture
def redis():
    """A client on Redis database 15, empty before and after the test."""
    with redis_db(REDIS_URL) as connection:
        yield connection


@pytest.fixture
def settings(tmp_path, redis, monkeypatch) -> Settings:
    """Two served models ("tiny", "other"), keys (legacy ones, and teams: `api_helpers`), small
    limits, the test job functions. Both
    models have their default curvature built, as after a worker's `--build-curvature` start
    (tests of curvature jobs delete the record: `curvature_index_key`)."""
    store_dir = tmp_path / "store"
    monkeypatch.setenv("CRISPEDIT_TEST_STORE", str(store_dir))  # for jobs_for_tests
    for model in ("tiny", "other"):
        for kind in CURVATURE_KINDS:
            record_built(redis, Store(store_dir), model, curvature_spec(kind))
    return Settings(
        redis_url=REDIS_URL,
        store_dir=store_dir,
        api_keys={
            hash_key(KEY_ALL): {"name": "all", "models": "*"},
            hash_key(KEY_TINY): {"name": "tiny-only", "models": ["tiny"]},
            hash_key(KEY_TINY_ADMIN): {
                "name": "tiny-admin",
                "team": "tiny-only",
                "grants": [{"model": "tiny", "role": "admin"}],
            },
            hash_key(KEY_A): {"name": "a-admin", "team": "team-a", "grants": [{"role": "admin"}]},
            hash_key(KEY_A_READ): {
                "name": "a-read",
                "team": "team-a",
                "grants": [{"role": "read"}],
            },
            hash_key(KEY_B): {"name": "b-admin", "team": "team-b", "grants": [{"role": "admin"}]},
        },
        models={"tiny": {"layers": ["model.layers.1.mlp.down_proj"]}, "other": {}},
        max_facts=5,
        max_body_bytes=16 * 1024,
        rate_limit_per_minute=1000,
        bad_key_limit_per_minute=100_000,  # the 401 sweeps make many; test_api_auth lowers it
        job_function="jobs_for_tests.apply_edit",
        curvature_function="jobs_for_tests.build_curvature",
        checkpoint_function="jobs_for_tests.write_checkpoint",
        checkpoints_kept=2,
        sse_poll_s=0.05,
    )


@pytest.fixture
def client(settings):
    """A TestClient on a fresh app (the real ASGI app, in-process)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def store(settings) -> Store:
    """The store the app reads (same folder)."""
    return Store(settings.store_dir)


@pytest.fixture
def live_server(settings):
    """A real uvicorn server on a free port of 127.0.0.1 in a thread; yields its base URL."""
    with serve(create_app(settings)) as url:
        yield url
