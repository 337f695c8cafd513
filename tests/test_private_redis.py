"""The tests, the demo and the load bench use a private redis-server, never the one on 6379 (a
developer's own, whose databases the tests would flush)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from live import redis_url
from redis import Redis

from service.local import start_redis

ROOT = Path(__file__).resolve().parents[1]
# tests/deploy reads docker-compose.yml, where 6379 is the Redis container's port on its network
SCANNED = ["tests", "scripts", "bench", "Makefile", ".ci/run"]
# a URL of the default Redis, or a client made without one (redis-py then connects to 6379)
SHARED_REDIS = re.compile(r"redis://(127\.0\.0\.1|localhost)(:6379)?[/\"']|\bRedis\(\)")


def test_the_test_redis_is_private_and_answers():
    url = redis_url(3)
    assert ":6379/" not in url
    client = Redis.from_url(url)
    client.set("probe", "1")
    assert client.get("probe") == b"1"
    client.flushdb()


def test_nothing_run_by_tests_demo_or_bench_names_the_shared_redis():
    offenders = []
    for entry in SCANNED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if not file.is_file() or file.suffix not in ("", ".py", ".sh"):
                continue
            if "deploy" in file.parts or file.name == Path(__file__).name:
                continue
            for number, line in enumerate(file.read_text(errors="ignore").splitlines(), 1):
                if SHARED_REDIS.search(line):
                    offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_server_started_on_a_taken_port_is_not_taken_for_the_one_answering(tmp_path, monkeypatch):
    """Parallel test processes each pick a free port; should two pick the same one, the server
    that loses the port must not report the winner's answers as its own (its tests would flush
    the other process's data). A stand-in `redis-server` that stays up a moment without serving
    meets the run's own private server on its port."""
    taken = int(redis_url(3).rsplit(":", 1)[1].split("/")[0])
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\nsleep 1\nexit 1\n")
    fake.chmod(0o755)
    cli = Path(shutil.which("redis-cli")).parent
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{cli}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="exited"):
        start_redis(taken, tmp_path / "data")
