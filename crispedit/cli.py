"""The `crispedit` command line: build curvature, edit, apply a delta, and a demo.

    crispedit curvature build --model smollm2 --corpus wikitext --tokens 20000 --out runs/curv
    crispedit edit --model smollm2 --facts facts.json --method crispedit --gamma 0.9 --out runs/e1
    crispedit apply --model smollm2 --delta runs/e1/delta.safetensors --out runs/edited-model
    crispedit demo

Every failure is one line on stderr (`crispedit: error: ...`) and exit status 2; a command that
fails writes nothing to its `--out` (results are staged in a temp folder and moved in at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from crispedit.artifacts import ArtifactError
from crispedit.corpus import BUILTIN, CorpusError
from crispedit.curvature import KINDS, LABELS
from crispedit.delta import DeltaError
from crispedit.facts import FactsError
from crispedit.models import ModelError
from crispedit.projector import ALIASES, GAMMA, METHODS

DEFAULT_TOKENS = 20_000
USER_ERRORS = (FactsError, CorpusError, ModelError, ArtifactError, DeltaError, ValueError, OSError)


class CLIError(Exception):
    """A usage error found by the CLI itself (a bad combination of flags)."""


@contextmanager
def staged_output(out: str | Path):
    """Yield a temp folder next to `out`; on success move its files into `out`, else drop it."""
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

    model, tokenizer = load_model(args.model)
    layers = parse_layers(model, args.layers)
    with staged_output(args.out) as stage:
        curvature = _curvature_from_args(model, tokenizer, args, layers)
        curvature.save(stage)
    print(
        f"curvature of {len(layers)} layers from {curvature.tokens} tokens "
        f"({curvature.meta['collect_seconds']:.1f} s) -> {Path(args.out) / 'curvature.safetensors'}"
    )


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


def cmd_edit(args) -> None:
    from crispedit.editor import CrispEditor
    from crispedit.facts import load_facts
    from crispedit.models import load_model, parse_layers
    from crispedit.projector import resolve_method

    facts = load_facts(args.facts, limit=args.limit)  # before the model: bad input fails fast
    method = resolve_method(args.method)
    model, tokenizer = load_model(args.model)
    layers = parse_layers(model, args.layers)
    with staged_output(args.out) as stage:
        started = time.perf_counter()
        curvature = None
        if method != "ft":
            curvature = load_or_build_curvature(model, tokenizer, args, layers)
        curvature_seconds = time.perf_counter() - started
        editor = CrispEditor(
            model,
            tokenizer,
            curvature,
            method=args.method,
            gamma=args.gamma,
            layers=layers,
            lr=args.lr,
            batch_size=args.batch_size,
            epochs=args.epochs,
            seed=args.seed,
        )
        delta = editor.edit(facts)
        delta.save(stage)
        report = {
            **delta.report,
            "time_s": {"curvature": round(curvature_seconds, 3), **delta.report["time_s"]},
            "curvature_tokens": curvature.tokens if curvature else None,
        }
        (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['n_edits']} edits with {report['method']}: efficacy "
        f"{report['efficacy_before']:.2f} -> {report['efficacy']:.2f} in {report['epochs']} "
        f"epochs; wrote {Path(args.out) / 'delta.safetensors'} and report.json"
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
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    _curvature_args(build)
    build.set_defaults(func=cmd_curvature_build)

    edit = sub.add_parser("edit", help="apply fact edits; write delta.safetensors + report.json")
    edit.add_argument("--model", required=True)
    edit.add_argument("--facts", required=True, help="our JSON/JSONL, CounterFact or zsRE file")
    edit.add_argument("--limit", type=int, help="use only the first N facts")
    edit.add_argument("--method", default="crispedit", choices=[*ALIASES, *METHODS])
    edit.add_argument("--gamma", type=float, default=GAMMA, help="protected curvature share")
    edit.add_argument("--layers")
    edit.add_argument("--curvature", help="a curvature file/folder (default: build it now)")
    edit.add_argument("--epochs", type=int, default=25)
    edit.add_argument("--lr", type=float, default=5e-4)
    edit.add_argument("--batch-size", type=int, default=32)
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--out", required=True)
    _curvature_args(edit)
    edit.set_defaults(func=cmd_edit)

    apply = sub.add_parser("apply", help="write an edited HF model folder from a delta")
    apply.add_argument("--model", required=True)
    apply.add_argument("--delta", required=True)
    apply.add_argument("--out", required=True)
    apply.add_argument("--revert", action="store_true", help="subtract the delta instead")
    apply.set_defaults(func=cmd_apply)

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
    gamma = getattr(args, "gamma", None)
    if gamma is not None and not 0.0 <= gamma <= 1.0:
        raise CLIError(f"--gamma must be between 0 and 1, not {gamma}")
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
