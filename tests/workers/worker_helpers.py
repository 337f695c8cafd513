"""Helpers shared by the worker tests (a module of its own, as `tests/service/api_helpers.py`):
the tiny model's resident engine registered for the jobs, and a real worker run until its queue
is empty."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from redis import Redis
from rq import Queue

from contract.jobs import queue_name
from workers import jobs
from workers.engine import Engine
from workers.worker import ResidentWorker


@contextmanager
def resident_engine(
    store_dir: Path, model_dir: Path, build_curvature: str | None = None
) -> Iterator[Engine]:
    """The tiny model's Engine on `store_dir` (300 curvature tokens), registered for the jobs
    (`workers.jobs`) while the block runs; with `build_curvature`, that kind is built first (warm,
    as a worker started with --build-curvature), else nothing is built."""
    engine = Engine("tiny", str(store_dir), model_path=str(model_dir), tokens=300)
    if build_curvature is not None:
        engine.build_curvature(build_curvature)
    jobs.register(engine)
    try:
        yield engine
    finally:
        jobs._ENGINES.pop("tiny", None)


def run_burst(redis: Redis) -> None:
    """Run a real `ResidentWorker` on the tiny model's queue until the queue is empty."""
    queue = Queue(queue_name("tiny"), connection=redis)
    ResidentWorker([queue], connection=redis, name=f"w-{uuid.uuid4().hex[:8]}").work(burst=True)
