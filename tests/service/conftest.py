"""Fixtures for the API tests: real Redis (database 15, flushed per test), a real store in
tmp_path, real RQ queues and workers, the app through TestClient or a real uvicorn server.

Test files are named test_api_*.py: tests/ has no packages, so their basenames must differ from
the other test folders' (tests/crispedit/test_streams.py exists).
"""

from __future__ import annotations

import threading
import time

import pytest
import uvicorn
from api_helpers import KEY_ALL, KEY_TINY, REDIS_URL
from fastapi.testclient import TestClient
from redis import Redis

from curvature_store import Store
from service.config import Settings
from service.keys import hash_key
from service.main import create_app


@pytest.fixture
def redis():
    """A client on Redis database 15, empty before and after the test."""
    conn = Redis.from_url(REDIS_URL)
    try:
        conn.ping()
    except Exception:
        pytest.fail("Redis must run on 127.0.0.1:6379 (see .ci/run)")
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


@pytest.fixture
def settings(tmp_path, redis, monkeypatch) -> Settings:
    """Two served models ("tiny", "other"), two keys, small limits, the test job function."""
    store_dir = tmp_path / "store"
    monkeypatch.setenv("CRISPEDIT_TEST_STORE", str(store_dir))  # for jobs_for_tests
    return Settings(
        redis_url=REDIS_URL,
        store_dir=store_dir,
        api_keys={
            hash_key(KEY_ALL): {"name": "all", "models": "*"},
            hash_key(KEY_TINY): {"name": "tiny-only", "models": ["tiny"]},
        },
        models={"tiny": {"layers": ["model.layers.1.mlp.down_proj"]}, "other": {}},
        max_facts=5,
        max_body_bytes=16 * 1024,
        rate_limit_per_minute=1000,
        job_function="jobs_for_tests.apply_edit",
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
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
