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
import gc
import json
import os
import platform
import random
import secrets
import shutil
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from curvature_store import Store
from service.keys import hash_key
from service.local import ROOT, free_port, private_redis, start, wait_ready

RESULTS = Path(__file__).parent / "results"
RUN_DIR = ROOT / "runs" / "bench-load"
CLIENTS = 200
DURATION_S = 60.0
POLL_S = 1.0
WARMUP_S = 5.0  # the ramp-up: 200 clients opening their connections within the first poll
STREAMS = 20
WORKER_MODEL = "tiny"
WORKER_TOKENS = 2048  # a small curvature: the worker is here to keep a core busy, not to edit well
# Sharing the API's cores, a worker at normal priority takes a core's worth of CPU time slices away
# from request handling; batch work yields to the latency-sensitive API (run it the same way when
# co-locating them; in compose they are separate containers). At 10, POST p99 was 50-54 ms.
WORKER_NICE = 19
API_WORKERS = 2  # uvicorn processes, as the API image runs (WEB_CONCURRENCY)
EDIT_OPTIONS = {"epochs": 2}
RETRIES = 3
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
    """Latency samples (seconds) and outcomes per route."""

    def __init__(self, warmup_until: float = 0.0) -> None:
        self.latency: dict[str, list[float]] = {}
        self.outcomes: dict[str, Counter] = {}
        self.warmup_until = warmup_until  # time.monotonic(): requests started before are not timed

    async def call(self, http: httpx.AsyncClient, route: str, method: str, url: str, **kw):
        """One request as a client sees it: a connection the server closed as it was reused
        (keep-alive race) is retried, at most RETRIES times, and the time counts from the first
        try. POSTs carry an Idempotency-Key, so a retry cannot enqueue a second job."""
        timed = time.monotonic() >= self.warmup_until
        started = time.perf_counter()
        outcome = self.outcomes.setdefault(route, Counter())
        for attempt in range(RETRIES + 1):
            try:
                response = await http.request(method, url, **kw)
                break
            except httpx.TransportError:
                outcome["retried"] += 1
                if attempt == RETRIES:
                    raise
        if timed:
            self.latency.setdefault(route, []).append(time.perf_counter() - started)
        outcome[response.status_code] += 1
        return response


async def client(
    i: int, http: httpx.AsyncClient, key: str, rec: Recorder, stop_at: float, args, accepted: list
) -> None:
    """One team: submit an edit, poll it to its end, repeat until `stop_at`."""
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": args.model, "stream": f"s{i % args.streams}", "facts": [FACT]}
    body["options"] = EDIT_OPTIONS
    await asyncio.sleep(random.uniform(0, args.poll))
    while time.monotonic() < stop_at:
        headers = {**auth, "Idempotency-Key": secrets.token_hex(8)}
        r = await rec.call(http, "POST /v1/edits", "POST", "/v1/edits", json=body, headers=headers)
        if r.status_code not in (200, 202):
            await asyncio.sleep(args.poll)
            continue
        job_id = r.json()["job_id"]
        accepted.append(job_id)
        while True:
            await asyncio.sleep(args.poll)
            r = await rec.call(
                http, "GET /v1/jobs/{job_id}", "GET", f"/v1/jobs/{job_id}", headers=auth
            )
            if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                break


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    """How late this process's event loop wakes a 10 ms sleep: the part of the measured latency
    that is the clients' own, not the server's."""
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - t - 0.01)


async def drive(url: str, keys: list[str], args) -> tuple[Recorder, list[str], float, list[float]]:
    rec, accepted, lag = Recorder(), [], []
    # a connection per client, as separate teams have; one shared pool of 200 connections would
    # make httpx itself the bottleneck (its pool search grows with the number of connections)
    limits = httpx.Limits(max_connections=1)
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=60) for _ in keys]
    # The clients' own garbage collection would pause all 200 of them at once (~100 ms seen) and
    # count as server latency: what exists now is frozen, and nothing is collected during the run
    gc.collect()
    gc.freeze()
    gc.disable()
    started = time.monotonic()
    stop_at = started + args.duration
    rec.warmup_until = started + args.warmup
    stop = asyncio.Event()
    monitor = asyncio.create_task(loop_lag(lag, stop))
    try:
        await asyncio.gather(
            *(
                client(i, http, keys[i], rec, stop_at, args, accepted)
                for i, http in enumerate(clients)
            )
        )
    finally:
        stop.set()
        await monitor
        for http in clients:
            await http.aclose()
        gc.enable()
    return rec, accepted, time.monotonic() - started, lag


def server_latency(metrics_text: str) -> dict[str, dict[float, float]]:
    """Cumulative share of requests per latency bucket (seconds), per route, as the API itself
    measured them (its Prometheus histogram): {"POST /v1/edits": {0.005: 0.62, ...}}."""
    counts: dict[str, dict[float, float]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith("crispedit_http_request_duration_seconds_bucket{"):
            continue
        labels, value = line[line.index("{") + 1 :].rsplit("} ", 1)
        fields = dict(item.split("=", 1) for item in labels.split(","))
        fields = {k: v.strip('"') for k, v in fields.items()}
        route = f"{fields['method']} {fields['route']}"
        counts.setdefault(route, {})[float(fields["le"])] = float(value)
    return {
        route: {le: n / buckets[float("inf")] for le, n in buckets.items() if buckets[float("inf")]}
        for route, buckets in counts.items()
    }


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


def table(rec: Recorder, wall: float, served: dict[str, dict[float, float]]) -> list[str]:
    rows = [
        "| route | requests | req/s | p50 | p99 | max | server: ≤ 10 / 50 ms | outcomes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for route, samples in rec.latency.items():
        ms = np.array(samples) * 1000
        outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(rec.outcomes[route].items(), key=str))
        answered = sum(n for k, n in rec.outcomes[route].items() if k != "retried")
        shares = served.get(route, {})
        server = " / ".join(f"{shares.get(le, float('nan')):.1%}" for le in (0.01, 0.05))
        rows.append(
            f"| {route} | {answered} | {answered / wall:.1f} | {np.percentile(ms, 50):.1f} ms "
            f"| {np.percentile(ms, 99):.1f} ms | {ms.max():.1f} ms | {server} | {outcomes} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--duration", type=float, default=DURATION_S, help="seconds of submissions")
    ap.add_argument("--poll", type=float, default=POLL_S, help="seconds between a client's polls")
    ap.add_argument("--streams", type=int, default=STREAMS)
    ap.add_argument(
        "--warmup", type=float, default=WARMUP_S, help="seconds of ramp-up not timed (counted)"
    )
    ap.add_argument("--model", default=WORKER_MODEL, help="the worker's model (name or HF folder)")
    ap.add_argument("--api-workers", type=int, default=API_WORKERS, help="uvicorn processes")
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument(
        "--worker-nice", type=int, default=WORKER_NICE, help="the worker's CPU niceness (0: none)"
    )
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/load.md")
    args = ap.parse_args()

    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    keys = [f"load-{i}-" + secrets.token_hex(8) for i in range(args.clients)]
    grants = {
        hash_key(k): {"name": f"team-{i}", "models": [args.model]} for i, k in enumerate(keys)
    }
    store_dir = RUN_DIR / "store"
    env = {
        **os.environ,
        "CRISPEDIT_STORE_DIR": str(store_dir),
        "CRISPEDIT_MODELS": json.dumps({args.model: {}}),
        "CRISPEDIT_API_KEYS": json.dumps(grants),
    }
    model_path = str(tiny_model(RUN_DIR / "tiny")) if args.model == "tiny" else args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        env["CRISPEDIT_REDIS_URL"] = private_redis(stack, RUN_DIR / "redis") + "/0"
        worker_env = {**env, "OMP_NUM_THREADS": str(args.worker_threads)}
        api = start(stack, "API", [str(bin_dir / "uvicorn"), "--factory", "service.main:create_app",
                                   "--http", "service.server:TimedH11Protocol",
                                   "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", str(args.api_workers),
                                   "--log-level", "warning", "--no-access-log"],
                    env, RUN_DIR / "api.log")  # fmt: skip
        nice = ["nice", "-n", str(args.worker_nice)] if args.worker_nice else []
        worker = start(stack, "worker", [*nice, str(bin_dir / "crispedit"), "worker",
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
        rec, accepted, wall, lag = asyncio.run(drive(url, keys[: args.clients], args))
        with httpx.Client(base_url=url, timeout=30) as probe:
            served = server_latency(probe.get("/metrics").text)
        if worker.poll() is not None:
            raise SystemExit("the worker died during the run; see its log")
    counts = accounting(Store(store_dir), args.model, args.streams, accepted)

    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; API: uvicorn, {args.api_workers} process(es); "
        "worker: `crispedit worker "
        f"--model {args.model}` ({args.worker_threads} torch thread, nice {args.worker_nice}), "
        "taking jobs throughout; "
        "clients: one asyncio process.",
        "",
        f"{args.clients} clients (one API key each), {args.duration:.0f} s of submissions, "
        f"a poll every {args.poll} s, {args.streams} streams; {wall:.0f} s until every job ended. "
        f"Latencies from {args.warmup:g} s on (the ramp-up is counted in the outcomes only); "
        "'server' is the API's own histogram (of one process, with several).",
        "",
        *table(rec, wall, served),
        "",
        f"Client event-loop lag (a 10 ms sleep woken late): p50 "
        f"{np.percentile(lag, 50) * 1000:.1f} ms, p99 {np.percentile(lag, 99) * 1000:.1f} ms.",
        "",
        f"Edits: {counts['accepted']} accepted, {counts['versions']} versions, "
        f"{counts['lost']} lost, {counts['duplicated']} duplicated, {counts['unknown']} unknown.",
        "",
        f"Command: `python bench/load.py --clients {args.clients} --duration {args.duration:g} "
        f"--poll {args.poll:g} --streams {args.streams} --warmup {args.warmup:g} "
        f"--api-workers {args.api_workers}`",
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
