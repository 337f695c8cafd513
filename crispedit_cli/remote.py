"""The commands that talk to the service: `submit`, `status`, `streams`, `download` and `log` call
the REST API, `worker` serves its queue.

    crispedit submit --model smollm2 --facts facts.json --wait
    crispedit streams --model smollm2
    crispedit download V --out delta.safetensors
    crispedit log --model smollm2 --stream main
    crispedit worker --model smollm2 --store /data/store --redis redis://redis:6379/0

This is the one module of the command line that imports `service` and `workers`, and only inside
the commands, so the engine and the local commands run without the service's dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from crispedit_cli.common import (
    DEFAULT_TOKENS,
    CLIError,
    add_placement_args,
    add_settings_args,
    given_options,
    store_model_name,
)
from crispedit_cli.curvature import CORPUS_HELP


@contextmanager
def api_client(args: argparse.Namespace) -> Iterator:
    """A client of the API at `--api` with `--key`; API and connection errors become CLIErrors."""
    import httpx

    from service.client import ApiError, CrispEditClient

    if not args.key:
        raise CLIError("no API key: pass --key or set CRISPEDIT_API_KEY")
    try:
        with CrispEditClient(args.api, args.key) as client:
            yield client
    except ApiError as err:
        raise CLIError(f"API: {err}") from err
    except httpx.HTTPError as err:
        raise CLIError(f"cannot reach the API at {args.api}: {err}") from err


def _show_progress(job: dict) -> None:
    p = job.get("progress") or {}
    epoch = (
        f" epoch {p['epoch']}/{p.get('epochs', '?')} loss {p['loss']:.4f}" if "epoch" in p else ""
    )
    print(f"{job['status']:<9} {p.get('phase', '')}{epoch}", file=sys.stderr, flush=True)


def _job_summary(job: dict) -> str:
    if job["status"] == "succeeded":
        return f"job {job['job_id']} succeeded: version {job['version']}, metrics {job['metrics']}"
    if job["status"] == "rejected":
        failed = ", ".join(sorted({f["rule"] for f in job["result"]["guard"]["failed"]}))
        return (
            f"job {job['job_id']} rejected: version {job['version']} is outside the stream's "
            f"policy ({failed}); kept, not published"
        )
    if job["status"] in ("failed", "cancelled"):
        return f"job {job['job_id']} {job['status']}: {job.get('error')}"
    return f"job {job['job_id']} {job['status']}"


def cmd_submit(args: argparse.Namespace) -> None:
    """`crispedit submit`: post the facts as one edit job (and, `--wait`, follow it)."""
    from contract.facts import fact_to_record, load_facts

    facts = [fact_to_record(f) for f in load_facts(args.facts, limit=args.limit)]
    options = given_options(args)  # the API applies its defaults and its own limits
    if args.force:
        options["force"] = True
    with api_client(args) as client:
        accepted = client.submit(
            args.model, facts, args.stream, args.parent, options, args.idempotency_key
        )
        print(f"submitted {len(facts)} facts: job {accepted['job_id']}", flush=True)
        if args.wait:
            job = client.wait(accepted["job_id"], timeout=args.timeout, on_progress=_show_progress)
            print(_job_summary(job))
            if job["status"] != "succeeded":
                raise CLIError(f"job {job['status']}: {job.get('error')}")


def cmd_status(args: argparse.Namespace) -> None:
    """`crispedit status`: a job's state (and, `--wait`, its end)."""
    with api_client(args) as client:
        if args.wait:
            job = client.wait(args.job, timeout=args.timeout, on_progress=_show_progress)
        else:
            job = client.job(args.job)
    print(_job_summary(job))


def cmd_streams(args: argparse.Namespace) -> None:
    """`crispedit streams`: the streams the key may read, one line each."""
    with api_client(args) as client:
        streams = client.streams(args.model)["streams"]
    print(f"{'model':<16} {'stream':<24} {'versions':>8}  {'head':<27} updated")
    for s in streams:
        head = s["head"] or "base"
        print(
            f"{s['model']:<16} {s['stream']:<24} {s['versions']:>8}  {head:<27} "
            f"{s['updated_at'] or '-'}"
        )


def cmd_download(args: argparse.Namespace) -> None:
    """`crispedit download`: a version's delta, or (`--format peft`) its PEFT adapter archive,
    the sha256 checked against the API's ETag."""
    from contract.adapters import archive_kind

    if args.format == "delta":
        if args.rank is not None or args.energy is not None:
            raise CLIError("--rank and --energy are for --format peft")
        with api_client(args) as client:
            path = client.download_delta(args.version, args.out, against=args.against)
        print(f"delta of {args.version} against {args.against} -> {path} (sha256 verified)")
        return
    archive = archive_kind(str(args.out))
    if archive is None:
        raise CLIError(f"--out {args.out}: an adapter downloads as a .tar.gz, .tgz or .zip file")
    with api_client(args) as client:
        path = client.download_adapter(args.version, args.out, args.rank, args.energy, archive)
    print(f"adapter of {args.version} -> {path} (sha256 verified)")


def cmd_checkpoint(args: argparse.Namespace) -> None:
    """`crispedit checkpoint`: have the workers write the merged model at a version into the
    store (`--wait`: until written), and (`--out`) download its files, resumably."""
    with api_client(args) as client:
        accepted = client.create_checkpoint(args.version)
        if accepted["status"] != "ready":
            print(f"checkpoint of {args.version}: job {accepted['job_id']}", flush=True)
            if not (args.wait or args.out):
                return
            job = client.wait(accepted["job_id"], timeout=args.timeout, on_progress=_show_progress)
            if job["status"] != "succeeded":
                raise CLIError(f"checkpoint job {job['status']}: {job.get('error')}")
        listing = client.checkpoint(args.version)
        print(
            f"checkpoint of {args.version}: {len(listing['files'])} files, {listing['bytes']} bytes"
        )
        if args.out:
            client.download_checkpoint(args.version, args.out)
            print(f"-> {args.out} (sha256 verified)")


def cmd_log(args: argparse.Namespace) -> None:
    """`crispedit log`: a stream's owner and its head moves, with who made each and when."""
    with api_client(args) as client:
        log = client.stream_log(args.model, args.stream)
    owner = log["owner"]["team"] if log["owner"] else "nobody"
    print(f"stream {log['model']}/{log['stream']}, owned by {owner}")
    for entry in log["entries"]:
        actor = entry["actor"] or {}
        who = f"{actor['team']} (key {actor['key_id']})" if actor else "unknown"
        print(f"{entry['at']}  {entry['op']:<8} {entry['version'] or 'base'}  by {who}")


def cmd_worker(args: argparse.Namespace) -> None:
    """`crispedit worker`: `workers.worker.run_worker` with the model on `--device`/`--dtype`."""
    from workers.worker import run_worker

    run_worker(
        args.model_name or store_model_name(args), args.store, args.redis, burst=args.burst,
        heartbeat_s=args.heartbeat, model_path=args.model, corpus=args.corpus,
        tokens=args.tokens, layers=args.layers, device=args.device, dtype=args.dtype,
        build_curvature=args.build_curvature,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Arguments


def add_worker(sub: argparse._SubParsersAction) -> None:
    """`crispedit worker`."""
    worker = sub.add_parser("worker", help="serve edit jobs from Redis with the model resident")
    worker.add_argument("--model", required=True)
    worker.add_argument("--model-name", help="name in the API and the store (default: alias)")
    worker.add_argument("--store", required=True)
    worker.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    worker.add_argument("--layers")
    worker.add_argument("--corpus", default="wikitext", help=CORPUS_HELP)
    worker.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="curvature tokens")
    worker.add_argument(
        "--build-curvature",
        action="store_true",
        help="before taking jobs, build (or resume, or find) the curvature of --corpus/--tokens",
    )
    add_placement_args(worker)
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--heartbeat", type=float, default=10.0, help="seconds between beats")
    worker.set_defaults(func=cmd_worker)


def _api_parser(sub: argparse._SubParsersAction, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--api", default=os.environ.get("CRISPEDIT_API_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("CRISPEDIT_API_KEY"), help="or env")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for --wait")
    return p


def add_api_commands(sub: argparse._SubParsersAction) -> None:
    """`crispedit submit`, `status`, `streams`, `download`, `log` and `checkpoint`."""
    submit = _api_parser(sub, "submit", "post fact edits to the API")
    submit.add_argument("--model", required=True)
    submit.add_argument("--facts", required=True)
    submit.add_argument("--limit", type=int)
    submit.add_argument("--stream", default="main")
    submit.add_argument("--parent", help="expected head version")
    add_settings_args(submit, api_only=True)
    submit.add_argument(
        "--force", action="store_true", help="publish even outside the stream's policy (admin)"
    )
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="poll until the job ends")
    submit.set_defaults(func=cmd_submit)
    status = _api_parser(sub, "status", "show (or --wait for) a job")
    status.add_argument("job")
    status.add_argument("--wait", action="store_true")
    status.set_defaults(func=cmd_status)
    streams = _api_parser(sub, "streams", "list the streams the key may read")
    streams.add_argument("--model", help="only this model's streams")
    streams.set_defaults(func=cmd_streams)
    download = _api_parser(sub, "download", "download a version's delta or PEFT adapter")
    download.add_argument("version")
    download.add_argument("--out", required=True, help="a .safetensors file (an adapter: .tar.gz)")
    download.add_argument("--against", choices=["parent", "base"], default="parent")
    download.add_argument("--format", choices=["delta", "peft"], default="delta")
    size = download.add_mutually_exclusive_group()
    size.add_argument("--rank", type=int, help="--format peft: every layer's rank")
    size.add_argument("--energy", type=float, help="--format peft: share of singular values")
    download.set_defaults(func=cmd_download)
    log = _api_parser(sub, "log", "show a stream's head moves: what, when and who")
    log.add_argument("--model", required=True)
    log.add_argument("--stream", default="main")
    log.set_defaults(func=cmd_log)
    checkpoint = _api_parser(sub, "checkpoint", "write (and download) a version's merged model")
    checkpoint.add_argument("version")
    checkpoint.add_argument("--wait", action="store_true", help="until the job has written it")
    checkpoint.add_argument("--out", help="download its files into this folder (resumable)")
    checkpoint.set_defaults(func=cmd_checkpoint)
