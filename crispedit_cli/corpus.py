"""`crispedit corpus generate`: a capability corpus the model writes itself.

    crispedit corpus generate --model smollm2 --tokens 100000 --out runs/generated.jsonl
    crispedit curvature build --model smollm2 --corpus runs/generated.jsonl --tokens 100000 ...

The documents are sampled by crispedit/generated.py and written as JSONL, which `--corpus` reads
like any other corpus. The settings and `--out` are checked before the model is loaded, and the
file appears only once the corpus is complete.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from crispedit.generated import SEED, TEMPERATURE, TOP_P
from crispedit_cli.common import CLIError, add_placement_args, load_model_of


def check_out_file(out: Path) -> None:
    """Refuse an `--out` that cannot become a file: a folder, or a path under a file or an
    unwritable folder (the folders missing on the way are created once the corpus is done)."""
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder, not a file")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"--out {out} cannot be written: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out} cannot be written: {parent} is not writable")


def cmd_corpus_generate(args: argparse.Namespace) -> None:
    """Sample `--tokens` tokens of documents from `--model` into `--out`, and say how fast."""
    from crispedit.generated import check_settings, generate_corpus

    check_settings(args.tokens, args.temperature, args.top_p)
    out = Path(args.out)
    check_out_file(out)
    model, tokenizer = load_model_of(args)
    info = generate_corpus(
        model, tokenizer, out, args.tokens, args.seed, args.temperature, args.top_p
    )
    print(
        f"{info['documents']} documents, {info['tokens']} tokens in {info['seconds']:.1f} s "
        f"({info['tokens_per_s']:.0f} tokens/s, seed {args.seed}) -> {out}"
    )


def add_corpus(sub: argparse._SubParsersAction) -> None:
    """`crispedit corpus generate`."""
    corpus = sub.add_parser("corpus", help="capability corpora")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    gen = corpus_sub.add_parser(
        "generate", help="sample a corpus from the model itself, as JSONL for --corpus"
    )
    gen.add_argument("--model", required=True, help="smollm2, a HF folder, or a cached HF id")
    gen.add_argument("--tokens", type=int, required=True, help="tokens to generate (at least)")
    gen.add_argument("--out", required=True, help="the JSONL file to write")
    gen.add_argument(
        "--seed", type=int, default=SEED, help="the same seed, device and dtype: the same corpus"
    )
    gen.add_argument("--temperature", type=float, default=TEMPERATURE)
    gen.add_argument("--top-p", type=float, default=TOP_P, help="1: no nucleus truncation")
    add_placement_args(gen)
    gen.set_defaults(func=cmd_corpus_generate)
