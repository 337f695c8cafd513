"""`crispedit curvature build`, and the capability curvature an edit uses.

    crispedit curvature build --model smollm2 --corpus wikitext --tokens 20000 --out runs/curv

The curvature of an edit comes from one of three places: a `--curvature` file (checked against the
model's fingerprint), the store's cached copy (built and stored on a miss), or a build now. Its
factors are float32 whatever the model's dtype; a file written by `build --out` records the
device and dtype the model ran in.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crispedit.corpus import BUILTIN
from crispedit.curvature import KINDS, LABELS
from crispedit_cli.common import (
    DEFAULT_TOKENS,
    CLIError,
    add_placement_args,
    load_model_of,
    open_store,
    placement_record,
    staged_output,
)

# ---------------------------------------------------------------------------------------------
# Where an edit's curvature comes from


def _curvature_from_args(model, tokenizer, args: argparse.Namespace, layers: list[str]):
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


def load_or_build_curvature(model, tokenizer, args: argparse.Namespace, layers: list[str]):
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


def edit_curvature(model, tokenizer, args: argparse.Namespace, layers: list[str], store):
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


def cmd_curvature_build(args: argparse.Namespace) -> None:
    """`crispedit curvature build`: the factors into `--out`, or into `--store` (cached)."""
    from crispedit.models import parse_layers

    if (args.out is None) == (args.store is None):
        raise CLIError("give exactly one of --out DIR and --store DIR")
    store = open_store(args.store) if args.store else None
    model, tokenizer = load_model_of(args)
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
        curvature.meta.update(placement_record(args))
        curvature.save(stage)
    print(
        f"curvature of {len(layers)} layers from {curvature.tokens} tokens "
        f"({curvature.meta['collect_seconds']:.1f} s) -> {Path(args.out) / 'curvature.safetensors'}"
    )


# ---------------------------------------------------------------------------------------------
# Arguments

CORPUS_HELP = (
    f"the capability corpus: {' or '.join(BUILTIN)} (bundled WikiText-2), a UTF-8 text file (one "
    'document a line), a .jsonl file of {"text": ...} records, either gzipped (.gz), a folder '
    "of such files, a glob (data/*.jsonl, ** recursive), or a Hugging Face datasets folder "
    "(save_to_disk); streamed, read only up to --tokens"
)


def add_curvature_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which curvature to collect (`build` and `edit` share them)."""
    p.add_argument("--corpus", default="wikitext", help=CORPUS_HELP)
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="corpus tokens to use")
    p.add_argument("--labels", choices=LABELS, default="empirical")
    p.add_argument("--kind", choices=KINDS, default="kfac", help="ekfac adds a second pass")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--curvature-batch", type=int, default=8, help="sequences per curvature batch")


def add_curvature_build(curv_sub: argparse._SubParsersAction) -> None:
    """`crispedit curvature build`."""
    build = curv_sub.add_parser("build", help="build K-FAC/EK-FAC factors for the target layers")
    build.add_argument("--model", required=True, help="smollm2, a HF folder, or a cached HF id")
    build.add_argument("--layers", help="block indices/ranges (20-24) or module names")
    build.add_argument("--out", help="write DIR/curvature.safetensors")
    build.add_argument(
        "--store",
        help="or keep it in this store (a second build is a cache hit; an interrupted build "
        "resumes from the checkpoint it left in the store's tmp/)",
    )
    build.add_argument("--seed", type=int, default=0)
    add_curvature_args(build)
    add_placement_args(build)
    build.set_defaults(func=cmd_curvature_build, curvature=None)
