"""The main job, end to end on this machine: Redis + API + one worker + SmolLM2.

    python scripts/demo.py          (what `make demo` runs)

Starts a private redis-server, the API (uvicorn) and one worker (`crispedit worker`) as
subprocesses on a fresh store under runs/demo-service, submits the demo facts with `POST /v1/edits`,
polls the job while the worker reports progress, downloads the version's delta (checking its
sha256 against the ETag), applies it to a local copy of SmolLM2 and prints before/after answers.
Every wait is bounded; the subprocesses are stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from service.local import free_port, private_redis, start, wait_ready

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "crispedit" / "assets" / "demo_facts.json"


def poll(client: httpx.Client, url: str, worker: subprocess.Popen, timeout: float) -> dict:
    """Poll a job until it ends, printing each new progress report."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        job = client.get(url).raise_for_status().json()
        shown = (job["status"], json.dumps(job["progress"], sort_keys=True))
        if shown != last:
            p = job["progress"] or {}
            detail = (
                f"epoch {p['epoch']}/{p['epochs']} loss {p['loss']:.4f}" if "epoch" in p else ""
            )
            print(f"  job {job['status']:<9} {p.get('phase', '')} {detail}")
            last = shown
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        if worker.poll() is not None:
            raise SystemExit("the worker exited; see its log")
        time.sleep(0.5)
    raise SystemExit("the job did not finish in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="curvature corpus tokens")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole job")
    args = ap.parse_args()
    started = time.perf_counter()

    from contract.facts import fact_to_record, load_facts
    from crispedit.delta import Delta, apply_delta
    from crispedit.demo import complete
    from crispedit.models import load_model

    run_dir = ROOT / "runs" / "demo-service"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    key = "demo-" + secrets.token_hex(16)
    env = {
        **os.environ,
        "CRISPEDIT_STORE_DIR": str(run_dir / "store"),
        "CRISPEDIT_MODELS": json.dumps({"smollm2": {}}),
        "CRISPEDIT_API_KEYS": json.dumps(
            {hashlib.sha256(key.encode()).hexdigest(): {"name": "demo", "models": ["smollm2"]}}
        ),
    }
    facts = load_facts(FACTS)
    model, tokenizer = load_model("smollm2")
    prompts = [("edit", f.prompt, f.target) for f in facts]
    prompts += [("paraphrase", p, f.target) for f in facts for p in f.paraphrases]
    prompts += [("neighbour", n.prompt, n.target) for f in facts for n in f.neighbors]
    before = [complete(model, tokenizer, p) for _, p, _ in prompts]

    port = free_port()
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        env["CRISPEDIT_REDIS_URL"] = private_redis(stack, run_dir / "redis") + "/0"
        api = start(stack, "API", [str(bin_dir / "uvicorn"), "--factory", "service.main:create_app",
                                   "--http", "service.server:TimedH11Protocol",
                                   "--host", "127.0.0.1", "--port", str(port)],
                    env, run_dir / "api.log")  # fmt: skip
        worker = start(stack, "worker", [str(bin_dir / "crispedit"), "worker", "--model", "smollm2",
                                         "--store", env["CRISPEDIT_STORE_DIR"],
                                         "--redis", env["CRISPEDIT_REDIS_URL"],
                                         "--tokens", str(args.tokens)],
                       env, run_dir / "worker.log")  # fmt: skip
        headers = {"Authorization": f"Bearer {key}"}
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30)
        )
        wait_ready(client, [api, worker], timeout=60)
        body = {"model": "smollm2", "stream": "demo", "facts": [fact_to_record(f) for f in facts]}
        accepted = client.post("/v1/edits", json=body).raise_for_status().json()
        print(f"POST /v1/edits -> 202, job {accepted['job_id']}; polling {accepted['url']}")
        job = poll(client, accepted["url"], worker, args.timeout)
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['status']}: {job['error']}")
        version = job["version"]
        response = client.get(f"/v1/versions/{version}/delta").raise_for_status()
        path = run_dir / "delta.safetensors"
        path.write_bytes(response.content)
        digest = hashlib.sha256(response.content).hexdigest()
        assert response.headers["etag"].strip('"') == digest, "the download does not match its ETag"
        print(f"GET /v1/versions/{version}/delta -> {len(response.content):,} bytes, sha256 ok")

    apply_delta(model, Delta.load(path))
    after = [complete(model, tokenizer, p) for _, p, _ in prompts]
    print(f"\n{'kind':<11} {'prompt':<50} {'wanted':<18} {'before':<24} after")
    for (kind, prompt, wanted), b, a in zip(prompts, before, after, strict=True):
        print(f"{kind:<11} {prompt[:50]:<50} {wanted[:18]:<18} {b[:24]:<24} {a}")
    metrics = job["metrics"] or {}
    print(
        f"\nversion {version}: efficacy {metrics.get('efficacy_before')} -> "
        f"{metrics.get('efficacy')} in {metrics.get('epochs')} epochs; "
        f"whole demo {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
