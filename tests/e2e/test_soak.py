"""Soak of one stream: 200 small edit jobs submitted back to back on one stream, through a real API,
Redis and `crispedit worker` processes, with the worker restarted (SIGTERM, then a new one) half
way. The final head has all 200 versions, in submission order, each naming its job; the
cumulative delta the API serves against the base equals the sum of the 200 deltas it serves one by
one; and the store verifies clean.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
from live import redis_db, redis_url, serve, wait_for
from safetensors.numpy import load_file

from curvature_store import Store
from service.client import CrispEditClient
from service.config import Settings
from service.keys import hash_key
from service.main import create_app

REDIS_URL = redis_url(10)
KEY = "soak-key"
JOBS = 200


def start_worker(tiny_model_dir, store_dir) -> subprocess.Popen:
    argv = [sys.executable, "-m", "crispedit.cli", "worker", "--model", str(tiny_model_dir),
            "--model-name", "tiny", "--store", str(store_dir), "--redis", REDIS_URL,
            "--tokens", "300"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_200_jobs_on_one_stream_survive_a_worker_restart(tmp_path, tiny_model_dir):
    settings = Settings(
        redis_url=REDIS_URL,
        store_dir=tmp_path / "store",
        api_keys={hash_key(KEY): {"name": "soak", "models": ["tiny"]}},
        models={"tiny": {}},
        rate_limit_per_minute=0,
    )
    store = Store(settings.store_dir)
    count = lambda: store.head_info("tiny", "soak")["count"]  # noqa: E731
    with redis_db(REDIS_URL), serve(create_app(settings)) as url:
        client = CrispEditClient(url, KEY)
        jobs = []
        for i in range(JOBS):
            fact = {"prompt": f"The code name of project {i} is", "target": f"word{i % 7}"}
            submitted = client.submit("tiny", [fact], stream="soak", options={"epochs": 1})
            jobs.append(submitted["job_id"])

        worker = start_worker(tiny_model_dir, settings.store_dir)
        try:
            wait_for(lambda: count() >= JOBS // 2, 300, "half of the jobs")
            worker.send_signal(signal.SIGTERM)  # warm shutdown: the job it runs ends first
            assert worker.wait(timeout=60) == 0
            restarted_at = count()
            assert restarted_at < JOBS  # the restart happened in the middle
            worker = start_worker(tiny_model_dir, settings.store_dir)
            wait_for(lambda: count() == JOBS, 300, "every job")
        finally:
            worker.terminate()
            worker.wait(timeout=60)

        views = [client.job(j) for j in jobs]
        assert {v["status"] for v in views} == {"succeeded"}
        lineage = list(reversed(store.lineage("tiny", "soak")))  # oldest first
        assert [m["job"] for m in lineage] == jobs
        assert [m["number"] for m in lineage] == list(range(1, JOBS + 1))
        assert [v["version"] for v in views] == [m["id"] for m in lineage]

        total = None
        for m in lineage:
            delta = load_file(client.download_delta(m["id"], tmp_path / "d.safetensors"))
            total = delta if total is None else {k: total[k] + delta[k] for k in total}
        head = lineage[-1]["id"]
        cumulative = load_file(
            client.download_delta(head, tmp_path / "cumulative.safetensors", against="base")
        )
        client.close()
    assert cumulative.keys() == total.keys()
    for name in total:
        np.testing.assert_allclose(cumulative[name], total[name], rtol=0, atol=1e-6)
    assert store.verify() == []
