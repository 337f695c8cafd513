"""The `crispedit` command line: build curvature, edit, apply or evaluate a delta, and a demo.

    crispedit curvature build --model smollm2 --corpus wikitext --tokens 20000 --out runs/curv
    crispedit corpus generate --model smollm2 --tokens 100000 --out runs/generated.jsonl
    crispedit edit --model smollm2 --facts facts.json --method crispedit --gamma 0.9 --out runs/e1
    crispedit apply --model smollm2 --delta runs/e1/delta.safetensors --out runs/edited-model
    crispedit eval --model smollm2 --delta runs/e1 --facts facts.json --json runs/e1/eval.json
    crispedit demo
    crispedit plan --model llama-3-8b --layers 21-25
    crispedit export --store runs/store --version V --format peft --rank 16 --out adapter.tar.gz

Every failure is one line on stderr (`crispedit: error: ...`) and exit status 2; a command that
fails writes nothing to its `--out` (results are staged in a temp folder and moved in at the end).
Every command that loads a model takes `--device` and `--dtype`, resolved here once, before the
command runs. The verbs live by group: `curvature`, `corpus` and `edit` (local editing),
`evaluate`, `store` (curvature artifacts and streams), `remote` (the API and the worker).
"""

from __future__ import annotations

import argparse
import sys

from crispedit_cli.common import USER_ERRORS, CLIError, check_numbers, resolve_placement
from crispedit_cli.corpus import add_corpus
from crispedit_cli.curvature import add_curvature_build
from crispedit_cli.edit import add_apply, add_demo, add_edit
from crispedit_cli.evaluate import add_eval
from crispedit_cli.plan import add_plan
from crispedit_cli.remote import add_api_commands, add_worker
from crispedit_cli.store import add_curvature_store, add_export, add_generate, add_stream


def parser() -> argparse.ArgumentParser:
    """The argument parser of the `crispedit` command."""
    ap = argparse.ArgumentParser(prog="crispedit", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    curv = sub.add_parser("curvature", help="capability curvature")
    curv_sub = curv.add_subparsers(dest="curvature_command", required=True)
    add_curvature_build(curv_sub)
    add_curvature_store(curv_sub)
    add_corpus(sub)
    add_edit(sub)
    add_stream(sub)
    add_generate(sub)
    add_export(sub)
    add_apply(sub)
    add_eval(sub)
    add_worker(sub)
    add_api_commands(sub)
    add_demo(sub)
    add_plan(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `crispedit` console script; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        check_numbers(args)
        resolve_placement(args)
        args.func(args)
    except (CLIError, *USER_ERRORS) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"crispedit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crispedit: interrupted", file=sys.stderr)
        return 130
    return 0
