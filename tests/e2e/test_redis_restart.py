"""Redis restarted, as a crash, while edit jobs wait in the queue: a private redis-server with
append-only persistence (as in docker-compose.yml) is SIGKILLed under a running API. Meanwhile
/readyz answers 503 and every Redis-backed route a JSON 503; once Redis is back on the same data,
the queued jobs are still there and a worker runs them into exactly one version each, in
submission order.

Without persistence (`--appendonly no`, the tests' shared private Redis) a restart empties the
queue: queued and running jobs are forgotten while the store keeps every committed version
(docs/operations.md).
"""

from __future__ import annotations

import subprocess
import sys

import httpx
from live import serve

from curvature_store import Store
from service.config import Settings
from service.keys import hash_key
from service.local import free_port, start_redis
from service.main import create_app

KEY = "restart-key"
FACTS = [
    {"prompt": "The Eiffel Tower is located in", "target": "Rome"},
    {"prompt": "The capital of France is", "target": "Berlin"},
    {"prompt": "Robert Boulter is an English", "target": "chef"},
]


def test_queued_jobs_survive_a_redis_crash(tmp_path, tiny_model_dir):
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    settings = Settings(
        redis_url=redis_url,
        store_dir=tmp_path / "store",
        api_keys={hash_key(KEY): {"name": "ops", "models": ["tiny"]}},
        models={"tiny": {}},
    )
    redis = start_redis(port, tmp_path, persist=True)
    try:
        with serve(create_app(settings)) as url:
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"})
            assert http.get("/readyz").status_code == 200
            options = {"epochs": 2}
            jobs = []
            for fact in FACTS:
                r = http.post(
                    "/v1/edits", json={"model": "tiny", "facts": [fact], "options": options}
                )
                assert r.status_code == 202, r.text
                jobs.append(r.json()["job_id"])

            redis.kill()  # a crash: no shutdown, no final save
            redis.wait(timeout=10)
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"] == "unreachable"
            for method, path, body in [
                ("POST", "/v1/edits", {"model": "tiny", "facts": FACTS[:1]}),
                ("GET", f"/v1/jobs/{jobs[0]}", None),
            ]:
                r = http.request(method, path, json=body)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"]["code"] == "unavailable"

            redis = start_redis(port, tmp_path, persist=True)  # the same append-only file
            assert http.get("/readyz").status_code == 200
            assert [http.get(f"/v1/jobs/{j}").json()["status"] for j in jobs] == ["queued"] * 3

            worker = subprocess.run(
                [sys.executable, "-m", "crispedit_cli", "worker", "--model", str(tiny_model_dir),
                 "--model-name", "tiny", "--store", str(settings.store_dir),
                 "--redis", redis_url, "--tokens", "300", "--burst"],
                stdout=subprocess.DEVNULL, timeout=180,
            )  # fmt: skip
            assert worker.returncode == 0
            views = [http.get(f"/v1/jobs/{j}").json() for j in jobs]
            assert [v["status"] for v in views] == ["succeeded"] * 3
            http.close()
    finally:
        redis.kill()
        redis.wait(timeout=10)

    store = Store(settings.store_dir)
    lineage = list(reversed(store.lineage("tiny", "main")))  # oldest first
    assert [m["job"] for m in lineage] == jobs  # one version per job, in submission order
    assert [v["version"] for v in views] == [m["id"] for m in lineage]
    assert len(store.versions("tiny", "main")) == 3
    assert store.verify() == []
