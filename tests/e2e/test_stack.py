"""The whole stack with nothing faked: a real uvicorn API, Redis, RQ and two `crispedit worker`
processes on a tiny model. Concurrent submissions on two streams; each stream's versions follow
its submission order; the downloaded cumulative delta, applied to the base model, gives the
answers the worker measured."""

from __future__ import annotations

import itertools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from live import redis_db, redis_url, serve
from safetensors.torch import load_file

from crispedit.delta import add_to_weights
from crispedit.evaluate import teacher_forced_accuracy
from crispedit.models import load_model
from service.client import CrispEditClient
from service.config import Settings
from service.keys import hash_key
from service.main import create_app

REDIS_URL = redis_url(12)
KEY = "e2e-key"
FACTS = [
    {"prompt": "The Eiffel Tower is located in", "target": "Rome"},
    {"prompt": "The capital of France is", "target": "Berlin"},
    {"prompt": "Robert Boulter is an English", "target": "chef"},
]


@pytest.fixture
def stack(tmp_path, tiny_model_dir):
    settings = Settings(
        redis_url=REDIS_URL,
        store_dir=tmp_path / "store",
        api_keys={hash_key(KEY): {"name": "e2e", "models": ["tiny"]}},
        models={"tiny": {}},
    )
    with redis_db(REDIS_URL), serve(create_app(settings)) as url:
        yield url, settings


@contextmanager
def workers(n: int, tiny_model_dir, settings):
    """`n` long-running `crispedit worker` processes, stopped (SIGTERM) on exit."""
    argv = [sys.executable, "-m", "crispedit.cli", "worker", "--model", str(tiny_model_dir),
            "--model-name", "tiny", "--store", str(settings.store_dir), "--redis", REDIS_URL,
            "--tokens", "300"]  # fmt: skip
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_submit_run_download_apply(stack, tiny_model_dir):
    url, settings = stack
    client = CrispEditClient(url, KEY)
    options = {"epochs": 8, "lr": 0.03}

    def submit(args):
        stream, fact = args
        return stream, client.submit("tiny", [fact], stream=stream, options=options)["job_id"]

    work = [(stream, fact) for fact in FACTS for stream in ("a", "b")]
    with ThreadPoolExecutor(6) as pool:  # concurrent submissions, both streams at once
        submitted = list(pool.map(submit, work))
    with workers(2, tiny_model_dir, settings) as procs:
        jobs = {job_id: client.wait(job_id, timeout=120, poll_s=0.2) for _, job_id in submitted}
        assert all(p.poll() is None for p in procs)  # no worker died on the way
    assert all(j["status"] == "succeeded" for j in jobs.values()), jobs

    for stream in ("a", "b"):
        listed = client.versions("tiny", stream)["versions"]
        assert len(listed) == 3
        lineage = list(reversed(listed))  # oldest first
        assert [v["parent"] for v in lineage] == [None, lineage[0]["id"], lineage[1]["id"]]
        # versions follow the order the API chained the jobs in (each waits for the previous)
        chain = sorted(
            (j for j in jobs.values() if j["stream"] == stream),
            key=lambda j: [v["id"] for v in lineage].index(j["version"]),
        )
        for earlier, later in itertools.pairwise(chain):
            assert later["timings"]["started_at"] >= earlier["timings"]["ended_at"]

        head = lineage[-1]["id"]
        path = client.download_delta(
            head, settings.store_dir.parent / f"{stream}.safetensors", against="base"
        )
        model, tokenizer = load_model(str(tiny_model_dir))
        add_to_weights(model, load_file(path))
        last = client.version(head)
        pairs = [(f["prompt"], f["target"]) for f in last["facts"]]
        assert teacher_forced_accuracy(model, tokenizer, pairs) == last["metrics"]["efficacy"]
    client.close()
