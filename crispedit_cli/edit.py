"""The commands that make and use an edit on this machine: `edit`, `apply` and `demo`.

    crispedit edit --model smollm2 --facts facts.json --method crispedit --gamma 0.9 --out runs/e1
    crispedit apply --model smollm2 --delta runs/e1/delta.safetensors --out runs/edited-model
    crispedit demo

The model loads on `--device` in `--dtype`. A delta is float32 whatever the model's dtype (the
edit's report records both); `apply` saves the edited model in the dtype it was loaded in.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from contract.jobs import curvature_kind
from crispedit_cli.common import (
    CLIError,
    add_placement_args,
    add_settings_args,
    load_model_of,
    open_store,
    placement_record,
    settings_from_args,
    staged_output,
    store_model_name,
)
from crispedit_cli.curvature import add_curvature_args, edit_curvature

# ---------------------------------------------------------------------------------------------
# Edit


def _edit_store(args: argparse.Namespace):
    """The store an edit uses (None without `--store`), after checking where the edit goes."""
    if args.stream is not None and args.store is None:
        raise CLIError("--stream needs --store")
    if args.out is None and args.stream is None:
        raise CLIError("--out is required (unless the edit goes to a --stream)")
    return open_store(args.store) if args.store else None


def _expected_parent(args: argparse.Namespace, store):
    """The parent `edit_on_stream` must find (a version id, None for base, `...` for any), after
    checking `--parent` against the stream's head so a conflict fails before the model loads."""
    if args.stream is None:
        return ...
    head = store.head(store_model_name(args), args.stream)  # also validates both names
    if args.parent is None:
        return ...
    parent = None if args.parent == "base" else args.parent
    if parent != head:
        raise CLIError(f"--parent {args.parent}: the head of {args.stream} is {head or 'base'}")
    return parent


def cmd_edit(args: argparse.Namespace) -> None:
    """`crispedit edit`: a delta (and report) into `--out`, and/or a version on `--stream`."""
    from contract.facts import load_facts
    from crispedit.consolidate import consolidate_edit
    from crispedit.editor import make_editor
    from crispedit.models import parse_layers
    from crispedit.streams import base_weights, edit_on_stream

    store = _edit_store(args)
    settings = settings_from_args(args)
    args.seed = settings.seed  # sampled curvature labels take the edit's seed
    facts = load_facts(args.facts, limit=args.limit)  # before the model: bad input fails fast
    parent = _expected_parent(args, store)
    model, tokenizer = load_model_of(args)
    layers = parse_layers(model, args.layers)
    base = base_weights(model, layers)
    with staged_output(args.out) as stage:
        started = time.perf_counter()
        curvature, curvature_key = None, None
        if curvature_kind(settings.method, settings.laplace, settings.consolidate) is not None:
            curvature, curvature_key = edit_curvature(model, tokenizer, args, layers, store)
        curvature_seconds = time.perf_counter() - started
        version = None
        if args.stream is None:
            editor = make_editor(model, tokenizer, curvature, settings, layers=layers)
            delta = editor.edit(facts)
            if settings.consolidate:  # a stream consolidates in edit_on_stream
                delta, _ = consolidate_edit(
                    model, tokenizer, curvature, base, delta, facts, settings.consolidate,
                    chat=editor.chat,
                )  # fmt: skip
        else:
            version, delta = edit_on_stream(
                store, store_model_name(args), args.stream, model, tokenizer, base, curvature,
                facts, settings=settings, parent=parent, curvature_key=curvature_key,
                force=args.force,
            )  # fmt: skip
        report = {
            **delta.report,
            "time_s": {"curvature": round(curvature_seconds, 3), **delta.report["time_s"]},
            "curvature_tokens": curvature.tokens if curvature else None,
            "version": version and {k: version[k] for k in ("id", "number", "parent", "stream")},
            **placement_record(args),
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
    guard = version.get("guard") if version else None
    if guard is not None and not guard["passed"] and not guard["forced"]:
        rules = ", ".join(sorted({f["rule"] for f in guard["failed"]}))
        raise CLIError(
            f"version {version['id']} is outside the policy of {args.stream} ({rules}): kept, "
            "not published; the head stays (--force publishes past the policy)"
        )


# ---------------------------------------------------------------------------------------------
# Apply and demo


def cmd_apply(args: argparse.Namespace) -> None:
    """`crispedit apply`: the model plus (or, `--revert`, minus) a delta, saved in its dtype."""
    from crispedit.delta import Delta, apply_delta, revert_delta

    delta = Delta.load(args.delta)
    model, tokenizer = load_model_of(args)
    (revert_delta if args.revert else apply_delta)(model, delta)
    with staged_output(args.out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    action = "reverted" if args.revert else "applied"
    print(f"{action} delta of {len(delta.layers)} layers; wrote the model to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """`crispedit demo`: `crispedit.demo.run_demo` with the command's flags."""
    from crispedit.demo import run_demo

    run_demo(
        model=args.model, out=args.out, tokens=args.tokens, device=args.device, dtype=args.dtype
    )


# ---------------------------------------------------------------------------------------------
# Arguments


def add_edit(sub: argparse._SubParsersAction) -> None:
    """`crispedit edit`."""
    edit = sub.add_parser("edit", help="apply fact edits; write delta.safetensors + report.json")
    edit.add_argument("--model", required=True)
    edit.add_argument("--facts", required=True, help="our JSON/JSONL, CounterFact or zsRE file")
    edit.add_argument("--limit", type=int, help="use only the first N facts")
    edit.add_argument("--layers")
    edit.add_argument("--curvature", help="a curvature file/folder (default: build it now)")
    edit.add_argument("--out", help="write DIR/delta.safetensors and DIR/report.json")
    edit.add_argument("--store", help="a store: caches curvature, holds streams")
    edit.add_argument("--stream", help="edit on top of this stream's head; publish a version")
    edit.add_argument("--model-name", help="the model's name in the store (default: alias/folder)")
    edit.add_argument("--parent", help="expected head (a version id or 'base'); else a conflict")
    edit.add_argument(
        "--force", action="store_true", help="publish even when outside the stream's policy"
    )
    add_settings_args(edit)
    add_curvature_args(edit)
    add_placement_args(edit)
    edit.set_defaults(func=cmd_edit)


def add_apply(sub: argparse._SubParsersAction) -> None:
    """`crispedit apply`."""
    apply = sub.add_parser("apply", help="write an edited HF model folder from a delta")
    apply.add_argument("--model", required=True)
    apply.add_argument("--delta", required=True)
    apply.add_argument("--out", required=True)
    apply.add_argument("--revert", action="store_true", help="subtract the delta instead")
    add_placement_args(apply)
    apply.set_defaults(func=cmd_apply)


def add_demo(sub: argparse._SubParsersAction) -> None:
    """`crispedit demo`."""
    demo = sub.add_parser("demo", help="edit SmolLM2 on three facts and show before/after")
    demo.add_argument("--model", default="smollm2")
    demo.add_argument("--tokens", type=int, default=8192, help="curvature corpus tokens")
    demo.add_argument("--out", default="runs/demo")
    add_placement_args(demo)
    demo.set_defaults(func=cmd_demo)
