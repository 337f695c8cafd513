"""Real services for tests: a Redis database of the local server, an ASGI app served by a real
uvicorn server, and a bounded wait. (A module, not a conftest: test folders each have their own
conftest.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from redis import Redis


@contextmanager
def redis_db(url: str) -> Iterator[Redis]:
    """A client on the database of `url`, flushed before and after; fails if Redis is down."""
    connection = Redis.from_url(url)
    try:
        connection.ping()
    except Exception:
        pytest.fail("these tests need Redis at 127.0.0.1:6379 (.ci/run starts it)")
    connection.flushdb()
    try:
        yield connection
    finally:
        connection.flushdb()
        connection.close()


@contextmanager
def serve(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(predicate, timeout: float, what: str, every: float = 0.05) -> None:
    """Poll `predicate()` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)
