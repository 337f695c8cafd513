"""Real services for tests: a database of the test run's private redis-server, an ASGI app served
by a real uvicorn server, and a bounded wait. (A module, not a conftest: test folders each have
their own conftest.)

The tests never touch a Redis they did not start: the one on 127.0.0.1:6379 may be a developer's
own, and the tests flush the databases they use. One private redis-server serves the whole run,
started on first use on a free port and stopped when the test process exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import uvicorn
from redis import Redis

from service.local import private_redis
from service.server import HTTP_PROTOCOL

_servers = ExitStack()
atexit.register(_servers.close)
_base_url: list[str] = []


def redis_url(db: int) -> str:
    """The URL of database `db` of this test run's private redis-server (started on first use)."""
    if not _base_url:
        data_dir = Path(tempfile.mkdtemp(prefix="crispedit-test-redis-"))
        _servers.callback(shutil.rmtree, data_dir, ignore_errors=True)
        _base_url.append(private_redis(_servers, data_dir))
    return f"{_base_url[0]}/{db}"


@contextmanager
def redis_db(url: str) -> Iterator[Redis]:
    """A client on the database of `url`, flushed before and after; fails if Redis is down."""
    connection = Redis.from_url(url)
    try:
        connection.ping()
    except Exception:
        pytest.fail(f"the test Redis at {url} does not answer")
    connection.flushdb()
    try:
        yield connection
    finally:
        connection.flushdb()
        connection.close()


@contextmanager
def serve(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free port of 127.0.0.1 in a thread; yields its base URL."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", http=HTTP_PROTOCOL
    )  # served as the deployment serves it, with the headers' deadline
    server = uvicorn.Server(config)
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
