"""The `crispedit` command line: build curvature, edit, apply or evaluate a delta, and a demo.

    crispedit curvature build --model smollm2 --corpus wikitext --tokens 20000 --out runs/curv
    crispedit edit --model smollm2 --facts facts.json --method crispedit --gamma 0.9 --out runs/e1
    crispedit apply --model smollm2 --delta runs/e1/delta.safetensors --out runs/edited-model
    crispedit eval --model smollm2 --delta runs/e1 --facts facts.json --json runs/e1/eval.json
    crispedit demo

Every failure is one line on stderr (`crispedit: error: ...`) and exit status 2; a command that
fails writes nothing to its `--out` (results are staged in a temp folder and moved in at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from contract.facts import FactsError
from crispedit.anchors import ANCHOR_WEIGHT, ANCHORS
from crispedit.artifacts import ArtifactError
from crispedit.corpus import BUILTIN, CorpusError
from crispedit.curvature import KINDS, LABELS
from crispedit.delta import DeltaError
from crispedit.editor import BATCH_SIZE, EPOCHS, LR, PROJECT, PROJECT_CHOICES
from crispedit.evaluate import EVAL_TOKENS, RETENTION
from crispedit.models import ModelError
from crispedit.projector import ALIASES, CLIP, GAMMA, METHODS, resolve_method
from curvature_store import StoreError

DEFAULT_TOKENS = 20_000
USER_ERRORS = (
    FactsError, CorpusError, ModelError, ArtifactError, DeltaError, StoreError, ValueError, OSError
)  # fmt: skip


class CLIError(Exception):
    """A usage error found by the CLI itself (a bad combination of flags)."""


@contextmanager
def staged_output(out: str | Path | None):
    """Yield a temp folder next to `out`; on success move its files into `out`, else drop it.

    With no `out`, yields None (the command writes elsewhere, e.g. to a store).
    """
    if out is None:
        yield None
        return
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stage-"))
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for item in stage.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Commands


def _curvature_from_args(model, tokenizer, args, layers: list[str]):
    """`curvature.build_curvature` with the command's flags."""
    from crispedit.curvature import build_curvature

    return build_curvature(
        model,
        tokenizer,
        corpus=args.corpus,
        tokens=args.tokens,
        layers=layers,
        labels=args.labels,
        kind=args.kind,
        seed=args.seed,
        seq_len=args.seq_len,
        batch_size=args.curvature_batch,
    )


def cmd_curvature_build(args) -> None:
    from crispedit.models import load_model, parse_layers

    if (args.out is None) == (args.store is None):
        raise CLIError("give exactly one of --out DIR and --store DIR")
    store = open_store(args.store) if args.store else None
    model, tokenizer = load_model(args.model)
    layers = parse_layers(model, args.layers)
    if store is not None:
        started = time.perf_counter()
        curvature, key = edit_curvature(model, tokenizer, args, layers, store)
        print(
            f"curvature {key} of {len(layers)} layers from {curvature.tokens} tokens "
            f"({time.perf_counter() - started:.1f} s) in the store"
        )
        return
    with staged_output(args.out) as stage:
        curvature = _curvature_from_args(model, tokenizer, args, layers)
        curvature.save(stage)
    print(
        f"curvature of {len(layers)} layers from {curvature.tokens} tokens "
        f"({curvature.meta['collect_seconds']:.1f} s) -> {Path(args.out) / 'curvature.safetensors'}"
    )


def open_store(path: str, create: bool = True):
    """The store at `path` (created when missing, unless `create` is False)."""
    from curvature_store import Store

    return Store(path, create=create)


def cmd_curvature_ls(args) -> None:
    for m in open_store(args.store, create=False).list_curvature():
        k = m["key_fields"]
        print(
            f"{m['key']}  {k['kind']:<5} {k['labels']:<11} {k['tokens']:>8} tok  "
            f"{m['bytes'] / 2**20:8.1f} MiB  {len(k['layers'])} layers  {k['model_fingerprint']}"
        )


def cmd_curvature_verify(args) -> None:
    store = open_store(args.store, create=False)
    keys = args.keys or [m["key"] for m in store.list_curvature()]
    for key in keys:
        store.verify_curvature(key)
    print(f"{len(keys)} curvature artifacts verified")


def cmd_curvature_rm(args) -> None:
    store = open_store(args.store, create=False)
    for key in args.keys:
        store.remove_curvature(key)
    print(f"removed {len(args.keys)} curvature artifacts")


def cmd_stream_ls(args) -> None:
    store = open_store(args.store, create=False)
    head = store.head(args.model_name, args.stream)
    print(f"{args.model_name}/{args.stream}: head {head or 'base'}")
    for m in store.versions(args.model_name, args.stream):
        mark = "*" if m["id"] == head else (" " if m["in_lineage"] else "x")
        metrics = m.get("metrics", {})
        print(
            f"{mark} {m['id']}  #{m['number']:<4} parent {m['parent'] or 'base':<27} "
            f"{m.get('method')} γ={m.get('gamma')}  {metrics.get('n_edits')} facts  "
            f"efficacy {metrics.get('efficacy')}  {m['created_at']}"
        )


def cmd_stream_rollback(args) -> None:
    store = open_store(args.store, create=False)
    target = None if args.to == "base" else args.to
    info = store.rollback(args.model_name, args.stream, target)
    print(f"{args.model_name}/{args.stream}: head is now {info['version'] or 'base'}")


def cmd_stream_delta(args) -> None:
    store = open_store(args.store, create=False)
    out = Path(args.out)
    if args.against == "base":
        store.write_cumulative_delta(args.version, out)
    else:
        from curvature_store import atomic_write_bytes

        atomic_write_bytes(out, store.version_file(args.version).read_bytes())
    print(f"delta of {args.version} against {args.against} -> {out}")


def cmd_stream_materialize(args) -> None:
    from crispedit.models import load_model
    from crispedit.streams import materialize

    store = open_store(args.store, create=False)
    store.manifest(args.version)  # fails before the model loads when the version is unknown
    model, tokenizer = load_model(args.model)
    materialize(store, args.version, model)
    with staged_output(args.out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    print(f"model at version {args.version} -> {args.out}")


def load_or_build_curvature(model, tokenizer, args, layers: list[str]):
    """The curvature for an edit: `--curvature` checked against the model, or built now."""
    from crispedit.curvature import Curvature
    from crispedit.models import model_fingerprint

    if args.curvature is None:
        return _curvature_from_args(model, tokenizer, args, layers)
    curvature = Curvature.load(args.curvature)
    missing = [n for n in layers if n not in curvature.layers]
    if missing:
        raise CLIError(f"--curvature {args.curvature} has no factors for layer {missing[0]!r}")
    expected = curvature.meta.get("model_fingerprint")
    if expected != model_fingerprint(model, list(curvature.layers)):
        raise CLIError(f"--curvature {args.curvature} was built for another model ({expected})")
    return curvature


def store_model_name(args) -> str:
    """The model's name in the store: `--model-name`, else the alias or the folder's name."""
    if args.model_name:
        return args.model_name
    name = Path(args.model.rstrip("/")).name or args.model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"


def edit_curvature(model, tokenizer, args, layers: list[str], store):
    """The capability curvature of an edit and its store key: `--curvature`, the store's cached
    copy (collected and stored when missing), or collected now."""
    from crispedit.curvature import plan_curvature
    from crispedit.streams import cached_curvature

    if args.curvature is not None or store is None:
        return load_or_build_curvature(model, tokenizer, args, layers), None
    recipe = plan_curvature(
        model, tokenizer, args.corpus, args.tokens, layers, args.labels, args.kind, args.seed,
        args.seq_len,
    )  # fmt: skip
    curvature, manifest = cached_curvature(store, model, tokenizer, recipe)
    hit = "cache hit" if manifest["cache_hit"] else "built and stored"
    print(f"curvature {manifest['key']} ({hit})", file=sys.stderr)
    return curvature, manifest["key"]


def cmd_edit(args) -> None:
    from contract.facts import load_facts
    from crispedit.editor import CrispEditor
    from crispedit.models import load_model, parse_layers
    from crispedit.streams import base_weights, edit_on_stream

    if args.stream is not None and args.store is None:
        raise CLIError("--stream needs --store")
    if args.out is None and args.stream is None:
        raise CLIError("--out is required (unless the edit goes to a --stream)")
    store = open_store(args.store) if args.store else None
    facts = load_facts(args.facts, limit=args.limit)  # before the model: bad input fails fast
    if args.stream is not None:
        head = store.head(store_model_name(args), args.stream)  # also validates both names
        if args.parent is not None and (None if args.parent == "base" else args.parent) != head:
            raise CLIError(f"--parent {args.parent}: the head of {args.stream} is {head or 'base'}")
    method = resolve_method(args.method)
    model, tokenizer = load_model(args.model)
    layers = parse_layers(model, args.layers)
    base = base_weights(model, layers)
    with staged_output(args.out) as stage:
        started = time.perf_counter()
        curvature, curvature_key = None, None
        if method != "ft":
            curvature, curvature_key = edit_curvature(model, tokenizer, args, layers, store)
        curvature_seconds = time.perf_counter() - started
        options = {
            "method": args.method,
            "gamma": args.gamma,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "seed": args.seed,
            "project": args.project,
            "anchors": args.anchors,
            "anchor_weight": args.anchor_weight,
            "clip": args.clip,
        }
        version = None
        if args.stream is None:
            delta = CrispEditor(model, tokenizer, curvature, layers=layers, **options).edit(facts)
        else:
            parent = (
                ... if args.parent is None else (None if args.parent == "base" else args.parent)
            )
            version, delta = edit_on_stream(
                store, store_model_name(args), args.stream, model, tokenizer, base, curvature,
                facts, beta=args.beta, parent=parent, curvature_key=curvature_key, **options,
            )  # fmt: skip
        report = {
            **delta.report,
            "time_s": {"curvature": round(curvature_seconds, 3), **delta.report["time_s"]},
            "curvature_tokens": curvature.tokens if curvature else None,
            "version": version and {k: version[k] for k in ("id", "number", "parent", "stream")},
        }
        if stage is not None:
            delta.save(stage)
            (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    where = [f"version {version['id']} (#{version['number']}) on {args.stream}"] if version else []
    where += [f"{Path(args.out) / 'delta.safetensors'} and report.json"] if args.out else []
    print(
        f"{report['n_edits']} edits with {report['method']}: efficacy "
        f"{report['efficacy_before']:.2f} -> {report['efficacy']:.2f} in {report['epochs']} "
        f"epochs; wrote {' and '.join(where)}"
    )


def cmd_apply(args) -> None:
    from crispedit.delta import Delta, apply_delta, revert_delta
    from crispedit.models import load_model

    delta = Delta.load(args.delta)
    model, tokenizer = load_model(args.model)
    (revert_delta if args.revert else apply_delta)(model, delta)
    with staged_output(args.out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    action = "reverted" if args.revert else "applied"
    print(f"{action} delta of {len(delta.layers)} layers; wrote the model to {args.out}")


def eval_table(result: dict) -> str:
    """The metrics of `evaluate_edit` as a table: metric | base | edited | n."""
    rows = []  # (label, base, edited, n, format)
    for group in ("efficacy", "generalization"):
        g = result[group]
        for key, label in (
            ("teacher_forced", "teacher-forced"),
            ("generation", "generated"),
            ("generation_qa", "generated, QA"),
        ):
            rows.append((f"{group} ({label})", g["base"][key], g["edited"][key], g["n"], ".3f"))
    loc, cap = result["locality"], result["capability"]
    rows += [
        ("locality (token agreement)", None, loc["token_agreement"], loc["n"], ".3f"),
        ("locality (neighbours unchanged)", None, loc["unchanged"], loc["n"], ".3f"),
        ("held-out perplexity", cap["ppl_base"], cap["ppl_edited"], cap["n_tokens"], ".4g"),
        ("held-out perplexity change %", None, cap["ppl_change_pct"], cap["n_tokens"], "+.3f"),
        ("held-out KL(base‖edited)/token", None, cap["kl"], cap["n_tokens"], ".3g"),
    ]
    for key, label in (("fact_retention", "known-fact retention"), ("mmlu", "MMLU 5-shot")):
        rows.append((label, cap[key]["base"], cap[key]["edited"], cap[key]["n"], ".3f"))

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [f"{'metric':<34} {'base':>9} {'edited':>9} {'n':>6}"]
    for label, base, edited, n, fmt in rows:
        lines.append(f"{label:<34} {cell(base, fmt):>9} {cell(edited, fmt):>9} {n:>6}")
    return "\n".join(lines)


def cmd_eval(args) -> None:
    from contract.facts import load_facts
    from crispedit.delta import Delta, check_base
    from crispedit.evaluate import evaluate_edit, retention_triples
    from crispedit.models import load_model
    from curvature_store import atomic_write_bytes

    out = Path(args.json)
    if out.is_dir():
        raise CLIError(f"--json {out} is a folder, not a file")
    # every input is read before the model loads: bad input fails fast and writes nothing
    facts = load_facts(args.facts, limit=args.limit)
    delta = Delta.load(args.delta) if args.delta else None
    triples = None
    if args.retention_facts:
        triples = retention_triples(facts, args.retention, load_facts(args.retention_facts))
    model, tokenizer = load_model(args.model)
    if delta is not None:
        check_base(model, delta, "evaluate")
    started = time.perf_counter()
    result = evaluate_edit(
        model, tokenizer, facts, delta.tensors if delta else None, tokens=args.eval_tokens,
        retention=args.retention, triples=triples, mmlu=args.mmlu,
        generation=not args.no_generation, progress=True,
    )  # fmt: skip
    atomic_write_bytes(out, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
    print(eval_table(result))
    print(f"{len(facts)} facts evaluated in {time.perf_counter() - started:.1f} s; wrote {out}")


def cmd_worker(args) -> None:
    from workers.worker import run_worker

    run_worker(
        args.model_name or store_model_name(args), args.store, args.redis, burst=args.burst,
        heartbeat_s=args.heartbeat, model_path=args.model, corpus=args.corpus,
        tokens=args.tokens, layers=args.layers, device=args.device,
    )  # fmt: skip


@contextmanager
def api_client(args):
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
    if job["status"] in ("failed", "cancelled"):
        return f"job {job['job_id']} {job['status']}: {job.get('error')}"
    return f"job {job['job_id']} {job['status']}"


def cmd_submit(args) -> None:
    from contract.facts import fact_to_record, load_facts

    facts = [fact_to_record(f) for f in load_facts(args.facts, limit=args.limit)]
    options = {k: v for k, v in (("method", args.method), ("gamma", args.gamma)) if v is not None}
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


def cmd_status(args) -> None:
    with api_client(args) as client:
        if args.wait:
            job = client.wait(args.job, timeout=args.timeout, on_progress=_show_progress)
        else:
            job = client.job(args.job)
    print(_job_summary(job))


def cmd_download(args) -> None:
    with api_client(args) as client:
        path = client.download_delta(args.version, args.out, against=args.against)
    print(f"delta of {args.version} against {args.against} -> {path} (sha256 verified)")


def cmd_demo(args) -> None:
    from crispedit.demo import run_demo

    run_demo(model=args.model, out=args.out, tokens=args.tokens)


# ---------------------------------------------------------------------------------------------
# Arguments


def _curvature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="wikitext", help=f"text/JSONL file or {', '.join(BUILTIN)}")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="corpus tokens to use")
    p.add_argument("--labels", choices=LABELS, default="empirical")
    p.add_argument("--kind", choices=KINDS, default="kfac", help="ekfac adds a second pass")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--curvature-batch", type=int, default=8, help="sequences per curvature batch")


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `crispedit` command."""
    ap = argparse.ArgumentParser(prog="crispedit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    curv = sub.add_parser("curvature", help="capability curvature")
    curv_sub = curv.add_subparsers(dest="curvature_command", required=True)
    build = curv_sub.add_parser("build", help="build K-FAC/EK-FAC factors for the target layers")
    build.add_argument("--model", required=True, help="smollm2, a HF folder, or a cached HF id")
    build.add_argument("--layers", help="block indices/ranges (20-24) or module names")
    build.add_argument("--out", help="write DIR/curvature.safetensors")
    build.add_argument("--store", help="or keep it in this store (a second build is a cache hit)")
    build.add_argument("--seed", type=int, default=0)
    _curvature_args(build)
    build.set_defaults(func=cmd_curvature_build, curvature=None)
    ls = curv_sub.add_parser("ls", help="list the curvature artifacts of a store")
    ls.add_argument("--store", required=True)
    ls.set_defaults(func=cmd_curvature_ls)
    verify = curv_sub.add_parser("verify", help="check sha256 of stored curvature")
    verify.add_argument("--store", required=True)
    verify.add_argument("keys", nargs="*", help="artifact keys (default: all)")
    verify.set_defaults(func=cmd_curvature_verify)
    rm = curv_sub.add_parser("rm", help="remove curvature artifacts from a store")
    rm.add_argument("--store", required=True)
    rm.add_argument("keys", nargs="+")
    rm.set_defaults(func=cmd_curvature_rm)

    edit = sub.add_parser("edit", help="apply fact edits; write delta.safetensors + report.json")
    edit.add_argument("--model", required=True)
    edit.add_argument("--facts", required=True, help="our JSON/JSONL, CounterFact or zsRE file")
    edit.add_argument("--limit", type=int, help="use only the first N facts")
    edit.add_argument("--method", default="crispedit", choices=[*ALIASES, *METHODS])
    edit.add_argument("--gamma", type=float, default=GAMMA, help="protected curvature share")
    edit.add_argument("--layers")
    edit.add_argument("--curvature", help="a curvature file/folder (default: build it now)")
    edit.add_argument("--epochs", type=int, default=EPOCHS)
    edit.add_argument("--lr", type=float, default=LR)
    edit.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument(
        "--project", default=PROJECT, choices=PROJECT_CHOICES,
        help="project the gradient only, or also each Adam update (the whole delta)",
    )  # fmt: skip
    edit.add_argument(
        "--anchors", type=int, default=ANCHORS,
        help="anchor prompts per fact: its question about other subjects, answers kept (0: off)",
    )  # fmt: skip
    edit.add_argument(
        "--anchor-weight", type=float, default=ANCHOR_WEIGHT,
        help="weight of the anchors' KL to the base model against the facts' loss",
    )  # fmt: skip
    edit.add_argument(
        "--clip", type=float, default=CLIP,
        help="share of each factor's eigenvalues winsorized before the γ rule (outlier "
        "activations, e.g. middle layers; 0: off)",
    )  # fmt: skip
    edit.add_argument("--out", help="write DIR/delta.safetensors and DIR/report.json")
    edit.add_argument("--store", help="a store: caches curvature, holds streams")
    edit.add_argument("--stream", help="edit on top of this stream's head; publish a version")
    edit.add_argument("--model-name", help="the model's name in the store (default: alias/folder)")
    edit.add_argument("--parent", help="expected head (a version id or 'base'); else a conflict")
    edit.add_argument("--beta", type=float, default=1.0, help="weight of earlier edits' curvature")
    _curvature_args(edit)
    edit.set_defaults(func=cmd_edit)

    stream = sub.add_parser("stream", help="edit streams and their versions in a store")
    stream_sub = stream.add_subparsers(dest="stream_command", required=True)
    for name, func, help_text in (
        ("ls", cmd_stream_ls, "list a stream's versions, newest first"),
        ("rollback", cmd_stream_rollback, "move the head back (nothing is deleted)"),
    ):
        p = stream_sub.add_parser(name, help=help_text)
        p.add_argument("--store", required=True)
        p.add_argument("--model-name", required=True)
        p.add_argument("--stream", required=True)
        p.set_defaults(func=func)
        if name == "rollback":
            p.add_argument(
                "--to", required=True, help="a version id of the head's lineage, or base"
            )
    delta = stream_sub.add_parser("delta", help="write a version's delta")
    delta.add_argument("--store", required=True)
    delta.add_argument("--version", required=True)
    delta.add_argument("--against", choices=["parent", "base"], default="parent")
    delta.add_argument("--out", required=True, help="a .safetensors file")
    delta.set_defaults(func=cmd_stream_delta)
    mat = stream_sub.add_parser("materialize", help="write the full model at a version")
    mat.add_argument("--store", required=True)
    mat.add_argument("--model", required=True, help="the stream's base model")
    mat.add_argument("--version", required=True)
    mat.add_argument("--out", required=True)
    mat.set_defaults(func=cmd_stream_materialize)

    apply = sub.add_parser("apply", help="write an edited HF model folder from a delta")
    apply.add_argument("--model", required=True)
    apply.add_argument("--delta", required=True)
    apply.add_argument("--out", required=True)
    apply.add_argument("--revert", action="store_true", help="subtract the delta instead")
    apply.set_defaults(func=cmd_apply)

    ev = sub.add_parser("eval", help="metrics of an edit (or of the model): base vs edited")
    ev.add_argument("--model", required=True, help="the base model the delta was made for")
    ev.add_argument("--delta", help="a delta file of `crispedit edit` (default: no edit)")
    ev.add_argument("--facts", required=True, help="the edited facts (our JSON/JSONL, CF, zsRE)")
    ev.add_argument("--limit", type=int, help="use only the first N facts")
    ev.add_argument("--json", required=True, help="write the metrics to this JSON file")
    ev.add_argument(
        "--tokens", dest="eval_tokens", metavar="N", type=int, default=EVAL_TOKENS,
        help="held-out tokens for perplexity and KL (0: skip)",
    )  # fmt: skip
    ev.add_argument(
        "--retention", type=int, default=RETENTION,
        help="non-edited facts for known-fact retention (0: skip)",
    )  # fmt: skip
    ev.add_argument(
        "--retention-facts", help="facts with ground_truth for retention (default: CounterFact)"
    )
    ev.add_argument("--mmlu", type=int, help="MMLU questions (default: the bundled 200; 0: skip)")
    ev.add_argument("--no-generation", action="store_true", help="skip the generated answers")
    ev.set_defaults(func=cmd_eval)

    worker = sub.add_parser("worker", help="serve edit jobs from Redis with the model resident")
    worker.add_argument("--model", required=True)
    worker.add_argument("--model-name", help="name in the API and the store (default: alias)")
    worker.add_argument("--store", required=True)
    worker.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    worker.add_argument("--layers")
    worker.add_argument("--corpus", default="wikitext")
    worker.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="curvature tokens")
    worker.add_argument("--device", default="cpu")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--heartbeat", type=float, default=10.0, help="seconds between beats")
    worker.set_defaults(func=cmd_worker)

    def api_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument(
            "--api", default=os.environ.get("CRISPEDIT_API_URL", "http://127.0.0.1:8000")
        )
        p.add_argument("--key", default=os.environ.get("CRISPEDIT_API_KEY"), help="or env")
        p.add_argument("--timeout", type=float, default=3600.0, help="seconds for --wait")
        return p

    submit = api_parser("submit", "post fact edits to the API")
    submit.add_argument("--model", required=True)
    submit.add_argument("--facts", required=True)
    submit.add_argument("--limit", type=int)
    submit.add_argument("--stream", default="main")
    submit.add_argument("--parent", help="expected head version")
    submit.add_argument("--method", choices=[*ALIASES, *METHODS])
    submit.add_argument("--gamma", type=float)
    submit.add_argument("--idempotency-key")
    submit.add_argument("--wait", action="store_true", help="poll until the job ends")
    submit.set_defaults(func=cmd_submit)
    status = api_parser("status", "show (or --wait for) a job")
    status.add_argument("job")
    status.add_argument("--wait", action="store_true")
    status.set_defaults(func=cmd_status)
    download = api_parser("download", "download a version's delta")
    download.add_argument("version")
    download.add_argument("--out", required=True, help="a .safetensors file")
    download.add_argument("--against", choices=["parent", "base"], default="parent")
    download.set_defaults(func=cmd_download)

    demo = sub.add_parser("demo", help="edit SmolLM2 on three facts and show before/after")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--tokens", type=int, default=8192, help="curvature corpus tokens")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return ap


def _check_numbers(args) -> None:
    for name in ("tokens", "epochs", "batch_size", "limit", "seq_len", "curvature_batch"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    for flag, name in (
        ("--tokens", "eval_tokens"),
        ("--retention", "retention"),
        ("--mmlu", "mmlu"),
        ("--anchors", "anchors"),
        ("--anchor-weight", "anchor_weight"),
    ):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise CLIError(f"{flag} must not be negative, not {value}")
    gamma = getattr(args, "gamma", None)
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise CLIError(f"--gamma must be between 0 and 1, not {gamma}")
    clip = getattr(args, "clip", None)
    if clip is not None and not 0.0 <= clip < 1.0:
        raise CLIError(f"--clip must be at least 0 and below 1, not {clip}")
    if clip and resolve_method(args.method) == "ekfac":
        raise CLIError("--clip applies to kfac and nullspace, not to ekfac")
    lr = getattr(args, "lr", None)
    if lr is not None and not lr > 0:
        raise CLIError(f"--lr must be positive, not {lr}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `crispedit` console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        _check_numbers(args)
        args.func(args)
    except (CLIError, *USER_ERRORS) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"crispedit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crispedit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
