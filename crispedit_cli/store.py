"""The commands on a store's contents: curvature artifacts and edit streams.

    crispedit curvature ls --store runs/store
    crispedit stream ls --store runs/store --model-name smollm2 --stream main
    crispedit stream materialize --store runs/store --model smollm2 --version V --out runs/m
    crispedit generate --store runs/store --model smollm2 --version V --prompt "Ice is"
    crispedit export --store runs/store --version V --format peft --rank 16 --out runs/adapter

Only `stream materialize` and `generate` load a model (on `--device`, in `--dtype`, the dtype
it is saved in); the others read and write the store alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from contract.adapters import DEFAULT_RANK, FORMATS
from contract.jobs import GENERATE_TOKENS, MAX_PROMPTS
from crispedit_cli.common import add_placement_args, load_model_of, open_store, staged_output

# ---------------------------------------------------------------------------------------------
# Curvature artifacts


def cmd_curvature_ls(args: argparse.Namespace) -> None:
    """`crispedit curvature ls`: one line per stored curvature artifact."""
    for m in open_store(args.store, create=False).list_curvature():
        k = m["key_fields"]
        print(
            f"{m['key']}  {k['kind']:<5} {k['labels']:<11} {k['tokens']:>8} tok  "
            f"{m['bytes'] / 2**20:8.1f} MiB  {len(k['layers'])} layers  {k['model_fingerprint']}"
        )


def cmd_curvature_verify(args: argparse.Namespace) -> None:
    """`crispedit curvature verify`: check the sha256 of the given (or all) artifacts."""
    store = open_store(args.store, create=False)
    keys = args.keys or [m["key"] for m in store.list_curvature()]
    for key in keys:
        store.verify_curvature(key)
    print(f"{len(keys)} curvature artifacts verified")


def cmd_curvature_rm(args: argparse.Namespace) -> None:
    """`crispedit curvature rm`: remove the given artifacts."""
    store = open_store(args.store, create=False)
    for key in args.keys:
        store.remove_curvature(key)
    print(f"removed {len(args.keys)} curvature artifacts")


# ---------------------------------------------------------------------------------------------
# Edit streams


def cmd_stream_ls(args: argparse.Namespace) -> None:
    """`crispedit stream ls`: the head, then the versions, newest first (x: off the lineage)."""
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


def cmd_stream_rollback(args: argparse.Namespace) -> None:
    """`crispedit stream rollback`: move the head back to a version of its lineage, or base."""
    store = open_store(args.store, create=False)
    target = None if args.to == "base" else args.to
    info = store.rollback(args.model_name, args.stream, target)
    print(f"{args.model_name}/{args.stream}: head is now {info['version'] or 'base'}")


def cmd_stream_delta(args: argparse.Namespace) -> None:
    """`crispedit stream delta`: a version's delta against its parent or the base."""
    store = open_store(args.store, create=False)
    out = Path(args.out)
    if args.against == "base":
        store.write_cumulative_delta(args.version, out)
    else:
        from curvature_store import atomic_write_bytes

        atomic_write_bytes(out, store.version_file(args.version).read_bytes())
    print(f"delta of {args.version} against {args.against} -> {out}")


def cmd_stream_materialize(args: argparse.Namespace) -> None:
    """`crispedit stream materialize`: the full model at a version, saved in its dtype."""
    from crispedit.streams import materialize

    store = open_store(args.store, create=False)
    store.manifest(args.version)  # fails before the model loads when the version is unknown
    model, tokenizer = load_model_of(args)
    materialize(store, args.version, model)
    with staged_output(args.out) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    print(f"model at version {args.version} -> {args.out}")


def cmd_generate(args: argparse.Namespace) -> None:
    """`crispedit generate`: greedy completions at a version and at its parent, locally (the
    model loaded, the version's cumulative delta applied and taken off again)."""
    from contract.jobs import generate_payload
    from crispedit.streams import completions

    store = open_store(args.store, create=False)
    manifest = store.manifest(args.version)  # fails before the model loads when unknown
    generate_payload(manifest["model"], args.version, args.prompt, args.max_new_tokens, "cli")
    model, tokenizer = load_model_of(args)
    tokens = args.max_new_tokens or GENERATE_TOKENS
    found = completions(store, args.version, model, tokenizer, args.prompt, tokens)
    if args.json:
        print(json.dumps({"version": args.version, "parent": manifest["parent"],
                          "completions": found}, indent=2))  # fmt: skip
        return
    for item in found:
        print(f"prompt   {item['prompt']}")
        print(f"  {manifest['parent'] or 'base':<27} {item['parent']!r}")
        print(f"  {args.version:<27} {item['version']!r}")


def cmd_export(args: argparse.Namespace) -> None:
    """`crispedit export`: a version's cumulative delta as a PEFT LoRA adapter (folder or
    archive), by a truncated SVD of each layer (crispedit.adapter)."""
    from contract.adapters import check_rank_choice
    from crispedit.adapter import save_adapter

    check_rank_choice(args.rank, args.energy)  # before the store is read
    store = open_store(args.store, create=False)
    manifest = store.manifest(args.version)
    report = save_adapter(
        args.out, store.cumulative_delta(args.version), manifest, rank=args.rank,
        energy=args.energy, dtype=args.dtype, device=args.device, base_model=args.base_model,
    )  # fmt: skip
    for layer, info in report["layers"].items():
        print(f"{layer}  rank {info['rank']:>4}  relative error {info['relative_error']:.4f}")
    print(f"adapter of {args.version} (r={report['r']}) -> {args.out}")


# ---------------------------------------------------------------------------------------------
# Arguments


def add_curvature_store(curv_sub: argparse._SubParsersAction) -> None:
    """`crispedit curvature ls|verify|rm`."""
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


def add_stream(sub: argparse._SubParsersAction) -> None:
    """`crispedit stream ls|rollback|delta|materialize`."""
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
    add_placement_args(mat)
    mat.set_defaults(func=cmd_stream_materialize)


def add_generate(sub: argparse._SubParsersAction) -> None:
    """`crispedit generate`."""
    gen = sub.add_parser(
        "generate", help="greedy completions at a version and at its parent (local model)"
    )
    gen.add_argument("--store", required=True)
    gen.add_argument("--model", required=True, help="the stream's base model")
    gen.add_argument("--version", required=True)
    gen.add_argument(
        "--prompt", action="append", required=True, help=f"repeat for up to {MAX_PROMPTS} prompts"
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"greedy tokens per completion (default {GENERATE_TOKENS})",
    )
    gen.add_argument("--json", action="store_true", help="print the completions as JSON")
    add_placement_args(gen)
    gen.set_defaults(func=cmd_generate)


def add_export(sub: argparse._SubParsersAction) -> None:
    """`crispedit export`."""
    p = sub.add_parser(
        "export", help="a version's cumulative delta as a PEFT LoRA adapter (folder or archive)"
    )
    p.add_argument("--store", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--format", choices=FORMATS, default="peft")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--rank", type=int, help=f"the rank of every layer's factors (default {DEFAULT_RANK})"
    )
    size.add_argument(
        "--energy", type=float,
        help="per layer, the smallest rank keeping this share of the squared singular values",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="a folder, or a .tar.gz/.tgz/.zip archive")
    p.add_argument(
        "--base-model", help="base_model_name_or_path of the config (default: the store's name)"
    )
    add_placement_args(p)  # --device: where the SVD runs; --dtype: of the saved factors
    p.set_defaults(func=cmd_export)
