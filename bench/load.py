"""Load on loopback: concurrent clients submit edits and poll their jobs while a worker is busy.

    python bench/load.py --clients 200 --duration 60

Starts a private stack (Redis database 14 of the local server, the API under uvicorn in one
process, one `crispedit worker` with one torch thread) and runs `--clients` clients in
one asyncio process, each with its own API key (a team each, so the per-key rate limit is the one
a real client meets). A client waits a random fraction of `--poll` (arrivals spread as in steady
traffic), then loops: `POST /v1/edits` (one fact, on one of `--streams` streams), then
`GET /v1/jobs/{id}` every `--poll` seconds until its job ends. After `--duration` seconds no new
edit is submitted; the clients keep polling until every accepted job has ended. Then every
accepted edit must have ended in exactly one version: the store's manifests name their jobs, and
the set of accepted job ids must equal the set of versions' jobs, without repeats.

The worker's model is by default a small random Llama with SmolLM2's tokenizer ("tiny": a job takes
a fraction of a second, so the queue drains within the run; the API's work per request does not
depend on the model); `--model smollm2` runs the real one (a job takes seconds, the drain minutes).

Prints, and writes to bench/results/load.md, requests/s and p50/p99/max latency per route
(measured by the clients, so it includes the client's own event loop) and the accounting of edits.
Not a test: the figures depend on the machine. Exit status 1 when an edit was lost or duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from curvature_store import Store
from service.keys import hash_key
from service.local import ROOT, ensure_redis, free_port, start, wait_ready

RESULTS = Path(__file__).parent / "results"
RUN_DIR = ROOT / "runs" / "bench-load"
REDIS_DB = 14
CLIENTS = 200
DURATION_S = 60.0
POLL_S = 1.0
STREAMS = 20
WORKER_MODEL = "tiny"
WORKER_TOKENS = 2048  # a small curvature: the worker is here to keep a core busy, not to edit well
EDIT_OPTIONS = {"epochs": 2}
FACT = {"prompt": "The Eiffel Tower is located in", "target": "Rome"}


def tiny_model(path: Path) -> Path:
    """A 4-block random Llama with SmolLM2's tokenizer, saved as an HF folder at `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from crispedit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Recorder:
    """Latency samples (seconds) and status codes per route."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.statuses: dict[str, Counter] = {}

    async def call(self, http: httpx.AsyncClient, route: str, method: str, url: str, **kw):
        started = time.perf_counter()
        response = await http.request(method, url, **kw)
        self.latency.setdefault(route, []).append(time.perf_counter() - started)
        self.statuses.setdefault(route, Counter())[response.status_code] += 1
        return response


async def client(
    i: int, http: httpx.AsyncClient, key: str, rec: Recorder, stop_at: float, args, accepted: list
) -> None:
    """One team: submit an edit, poll it to its end, repeat until `stop_at`."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": args.model, "stream": f"s{i % args.streams}", "facts": [FACT]}
    body["options"] = EDIT_OPTIONS
    await asyncio.sleep(random.uniform(0, args.poll))
    while time.monotonic() < stop_at:
        r = await rec.call(http, "POST /v1/edits", "POST", "/v1/edits", json=body, headers=headers)
        if r.status_code != 202:
            await asyncio.sleep(args.poll)
            continue
        job_id = r.json()["job_id"]
        accepted.append(job_id)
        while True:
            await asyncio.sleep(args.poll)
            r = await rec.call(
                http, "GET /v1/jobs/{id}", "GET", f"/v1/jobs/{job_id}", headers=headers
            )
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                break


async def drive(url: str, keys: list[str], args) -> tuple[Recorder, list[str], float]:
    rec, accepted = Recorder(), []
    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        started = time.monotonic()
        stop_at = started + args.duration
        tasks = [
            client(i, http, keys[i], rec, stop_at, args, accepted) for i in range(args.clients)
        ]
        await asyncio.gather(*tasks)
        return rec, accepted, time.monotonic() - started


def accounting(store: Store, model: str, streams: int, accepted: list[str]) -> dict:
    """Accepted edits against the versions in the store (each names its job)."""
    jobs = []
    for s in range(streams):
        jobs += [m.get("job") for m in store.lineage(model, f"s{s}")]
    counts = Counter(jobs)
    return {
        "accepted": len(accepted),
        "versions": len(jobs),
        "lost": len(set(accepted) - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "unknown": len(set(counts) - set(accepted)),
    }


def table(rec: Recorder, wall: float) -> list[str]:
    rows = [
        "| route | requests | req/s | p50 | p99 | max | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for route, samples in rec.latency.items():
        ms = np.array(samples) * 1000
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(rec.statuses[route].items()))
        rows.append(
            f"| {route} | {len(ms)} | {len(ms) / wall:.1f} | {np.percentile(ms, 50):.1f} ms "
            f"| {np.percentile(ms, 99):.1f} ms | {ms.max():.1f} ms | {statuses} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--duration", type=float, default=DURATION_S, help="seconds of submissions")
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between a client's polls")
    ap.add_argument("--streams", type=int, default=STREAMS)
    ap.add_argument("--model", default=WORKER_MODEL, help="the worker's model (name or HF folder)")
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/load.md")
    args = ap.parse_args()

    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    ensure_redis()
    subprocess.run(["redis-cli", "-n", str(REDIS_DB), "flushdb"], check=True, capture_output=True)
    keys = [f"load-{i}-" + secrets.token_hex(8) for i in range(args.clients)]
    grants = {
        hash_key(k): {"name": f"team-{i}", "models": [args.model]} for i, k in enumerate(keys)
    }
    store_dir = RUN_DIR / "store"
    env = {
        **os.environ,
        "CRISPEDIT_STORE_DIR": str(store_dir),
        "CRISPEDIT_REDIS_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "CRISPEDIT_MODELS": json.dumps({args.model: {}}),
        "CRISPEDIT_API_KEYS": json.dumps(grants),
    }
    worker_env = {**env, "OMP_NUM_THREADS": str(args.worker_threads)}
    model_path = str(tiny_model(RUN_DIR / "tiny")) if args.model == "tiny" else args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        api = start(stack, "API", [str(bin_dir / "uvicorn"), "--factory", "service.main:create_app",
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "warning", "--no-access-log"],
                    env, RUN_DIR / "api.log")  # fmt: skip
        worker = start(stack, "worker", [str(bin_dir / "crispedit"), "worker",
                                         "--model", model_path, "--model-name", args.model,
                                         "--store", str(store_dir),
                                         "--redis", env["CRISPEDIT_REDIS_URL"],
                                         "--tokens", str(WORKER_TOKENS)],
                       worker_env, RUN_DIR / "worker.log")  # fmt: skip
        with httpx.Client(base_url=url, timeout=30) as probe:
            wait_ready(probe, [api, worker], timeout=60)
            # the worker's first job builds its curvature: do it before the clock starts
            warm = probe.post(
                "/v1/edits",
                json={
                    "model": args.model,
                    "stream": "warmup",
                    "facts": [FACT],
                    "options": EDIT_OPTIONS,
                },
                headers={"Authorization": f"Bearer {keys[0]}"},
            ).json()["job_id"]
            print("warming the worker up (curvature) ...", flush=True)
            deadline = time.monotonic() + 600
            while (
                probe.get(
                    f"/v1/jobs/{warm}", headers={"Authorization": f"Bearer {keys[0]}"}
                ).json()["status"]
                != "succeeded"
            ):
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the worker did not finish its warm-up job; see its log")
                time.sleep(0.5)
        print(
            f"{args.clients} clients, {args.duration:.0f} s of submissions, a poll every "
            f"{args.poll} s",
            flush=True,
        )
        rec, accepted, wall = asyncio.run(drive(url, keys, args))
        if worker.poll() is not None:
            raise SystemExit("the worker died during the run; see its log")
    counts = accounting(Store(store_dir), args.model, args.streams, accepted)

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; API: uvicorn, 1 process; worker: `crispedit worker "
        f"--model {args.model}` ({args.worker_threads} torch thread), taking jobs throughout; "
        "clients: one asyncio process.",
        "",
        f"{args.clients} clients (one API key each), {args.duration:.0f} s of submissions, "
        f"a poll every {args.poll} s, {args.streams} streams; {wall:.0f} s until every job ended.",
        "",
        *table(rec, wall),
        "",
        f"Edits: {counts['accepted']} accepted, {counts['versions']} versions, "
        f"{counts['lost']} lost, {counts['duplicated']} duplicated, {counts['unknown']} unknown.",
        "",
        f"Command: `python bench/load.py --clients {args.clients} --duration {args.duration:g} "
        f"--poll {args.poll:g} --streams {args.streams}`",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "load.md").write_text(text + "\n")
    ok = counts["lost"] == counts["duplicated"] == counts["unknown"] == 0
    ok = ok and counts["versions"] == counts["accepted"]
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
